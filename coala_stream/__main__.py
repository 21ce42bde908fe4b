"""`python -m coala_stream` == `coala-stream`."""

import sys

from .cli import main

sys.exit(main())
