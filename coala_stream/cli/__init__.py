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
from ..errors import CoalaError, Interrupted, os_error_line
from ..signals import Terminated, terminate_raises

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
            75 interrupted after saving progress (rerun the same command to resume),
            130 / 143 SIGINT / SIGTERM before a stage had anything to save
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``only``: register that subcommand alone (what `main` does once argv names
    one), so a command imports only its own modules at parse time, not every subcommand's."""
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
        if only is None or name == only:
            import_module(f".{name}", __name__).register(subparsers)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word that is not an option), None if none."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """The program (``argv`` None: ``sys.argv``, and the signal handlers stay for the exit);
    with ``argv``, in-process: the caller's handlers are put back."""
    if argv is None:
        code = _main(sys.argv[1:])
        _hold_signals_until_exit()
        return code
    return _main(list(argv))


def _hold_signals_until_exit() -> None:
    """After the command: ignore SIGINT/SIGTERM while the interpreter shuts down (seconds with
    torch loaded). Python puts the default handler back while finalizing wherever it had
    one of its own, so a signal then killed the finished command (exit -2/-15, found by
    tools/soak.py); an ignored one stays ignored, and the command ends with its own code.
    (Blocking them is not enough: the other threads still take them.) SIGKILL still works."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _main(argv: list[str]) -> int:
    command, debug = _command(argv), "--debug" in argv
    # Parsing is inside the handlers too: a subcommand's options import torch, which takes
    # seconds, and a Ctrl-C or SIGTERM then must end in one line like any other moment.
    try:
        with terminate_raises():
            parser = build_parser(command)
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return 2
            return _run(args)
    except KeyboardInterrupt as exc:  # Terminated (SIGTERM) is one
        if debug:
            raise
        _quiet_pending_tasks()
        sig, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("SIGINT", 130)
        print(f"coala-stream {command or ''}".rstrip() + f": stopped by {sig} (whatever was "
              f"committed is kept); rerun the same command to resume", file=sys.stderr)
        return code


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:  # progress is saved: not an error, a pause
        _quiet_pending_tasks()
        print(f"coala-stream {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except CoalaError as exc:
        if args.debug:
            raise
        print(f"coala-stream {args.command}: error: {exc}", file=sys.stderr)
        if exc.exit_code == 1:  # a usage error (2) or an interruption (75) needs no traceback
            print("  (run with --debug for the traceback)", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the file system's (full, read-only, no permission): not a bug
        if args.debug:
            raise
        print(f"coala-stream {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        print("  (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _quiet_pending_tasks() -> None:
    """An interrupt can leave zarr's I/O coroutines pending in its event loop thread; asyncio
    then logs "Task was destroyed but it is pending!" for each at exit: noise after the line
    that said what happened (and nothing lost: a store write is never half done, see
    `signals.deferred`)."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
