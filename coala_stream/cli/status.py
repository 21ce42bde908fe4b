"""`coala-stream status`: show what a store holds and how far capture and reduce got."""

from ._common import add_parser, not_implemented


def register(subparsers) -> None:
    p = add_parser(subparsers, "status", "show what a store holds and how far capture and reduce got", "Show what a store holds and how far capture and reduce got.\n\nNot implemented yet (issue 4).")
    p.set_defaults(func=not_implemented("status", "issue 4"))
