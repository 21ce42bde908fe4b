"""`coala-stream eval`: perplexity of a model or a solve output on non-overlapping windows of a text."""

from __future__ import annotations

import json
import sys

from ._common import add_parser, command_threads
from .options import add_options, config_from_args

DESCRIPTION = """\
Perplexity of a model or a solve output on non-overlapping windows of a text.

The protocol of GPTQ / SVD-LLM: the whole text (line endings normalised to \\n)
is tokenized once, cut into non-overlapping windows of --seq-len tokens, each
window is run on its own, and ppl = exp(mean NLL over every predicted token).
MODEL may be a Hugging Face directory, a .gguf file, a solve output
(factorized, dense or peft; detected from the directory), or omitted for the
embedded SmolLM2-135M-Instruct. Prints one line (stderr with --json).
"""

EPILOG = """\
examples:
  coala-stream eval                                   # embedded SmolLM2, held-out builtin text
  coala-stream eval smol-80 --data ../shared/data/wikitext-2-raw/wiki.test.raw --max-windows 40
  coala-stream eval smol-lora --seq-len 1024 --device cuda --json
"""


def register(subparsers) -> None:
    from ..evaluate import EvalConfig

    p = add_parser(subparsers, "eval",
                   "perplexity of a model or a solve output on non-overlapping windows of a text",
                   DESCRIPTION, EPILOG)
    add_options(p, EvalConfig)
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout (the line goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate import EvalConfig, evaluate

    config = config_from_args(EvalConfig, args)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with command_threads(config.threads):  # the line says the count (one line: see --help)
        result = evaluate(config, progress=not args.quiet)
    if args.json:
        print(result.line(), file=sys.stderr)
        print(json.dumps(result.to_dict()))
    else:
        print(result.line())
    sys.stdout.flush()
    return 0
