"""Small helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse

from ..errors import CoalaError


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
    pass


class NotImplementedYet(CoalaError):
    exit_code = 3


def not_implemented(command: str, issue: str):
    """For a subcommand whose library code has not landed: say so, do nothing."""

    def run(args) -> int:
        raise NotImplementedYet(
            f"'{command}' is not implemented yet ({issue}); nothing was read or written"
        )

    return run
