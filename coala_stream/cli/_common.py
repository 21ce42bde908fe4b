"""Small helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse
from contextlib import contextmanager


def add_parser(subparsers, name: str, summary: str, description: str, epilog: str = ""):
    """A subcommand parser whose --help keeps our line breaks and shows defaults."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=_Formatter,
    )


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    # "(default: None)" and "(default: False)" tell a reader nothing: an option without a
    # value says in its own help what happens when it is left out, and a flag is off unless given.
    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


@contextmanager
def command_threads(threads: int | None):
    """Apply the thread rule once per command (`devices.choose_threads`); yields the line
    for the closing summary ("threads: N (why)"). The library's ``threads=None`` keeps the
    caller's torch setting, so the CLI is where the rule becomes the default. The count is
    restored afterwards, so ``main()`` called in-process leaves the caller's setting."""
    from ..devices import choose_threads, torch_threads

    count, why = choose_threads(threads)
    with torch_threads(count):
        yield f"threads: {count} ({why})"


def threads_line(line: str, used: int) -> str:
    """`command_threads`' line, or what a resumed run used instead (the count its state
    recorded when it was started: `devices.resumed_threads`)."""
    if line.startswith(f"threads: {used} "):
        return line
    return f"threads: {used} (kept from the run that started this work; the rule gave {line[9:]})"
