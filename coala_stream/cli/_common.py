"""Small helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse


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
