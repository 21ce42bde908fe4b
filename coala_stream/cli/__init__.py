"""`coala-stream` command line: parsing only; each subcommand calls the library.

Each subcommand lives in its own module exposing `register(subparsers)`, which
adds a parser whose `func(args) -> int` does the work. Known errors
(`CoalaError`) become one line on stderr and their exit code; `--debug` keeps
the traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .._version import __version__
from ..errors import CoalaError, Interrupted

# Order is the order shown in --help: the pipeline, then inspection.
SUBCOMMANDS = ("compress", "capture", "reduce", "merge", "solve", "eval", "status")

DESCRIPTION = """\
Context-aware low-rank compression of LLMs without the Gram matrix (COALA).

Pipeline:
  capture  ->  reduce  ->  solve  ->  eval
  (activations to disk) (R = qr(X).R, streamed) (W' = U_r U_r^T W) (perplexity)
"""

EPILOG = """\
examples:
  coala-stream capture --out calib.zarr                    # embedded SmolLM2, builtin text
  coala-stream reduce calib.zarr
  coala-stream solve calib.zarr --ratio 0.2 --out smol-80
  coala-stream eval smol-80 --data wiki.test.raw
  coala-stream status calib.zarr

exit codes: 0 ok, 1 error (message says why), 2 bad usage,
            75 interrupted after saving progress (rerun the same command to resume)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coala-stream",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"coala-stream {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        import_module(f".{name}", __name__).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:  # progress is saved: not an error, a pause
        print(f"coala-stream {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except CoalaError as exc:
        if args.debug:
            raise
        print(f"coala-stream {args.command}: error: {exc}", file=sys.stderr)
        if exc.exit_code == 1:  # a usage error (2) or an interruption (75) needs no traceback
            print("  (run with --debug for the traceback)", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"coala-stream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
