"""`python -m coala_stream.cli` == `coala-stream`."""

import sys

from . import main

sys.exit(main())
