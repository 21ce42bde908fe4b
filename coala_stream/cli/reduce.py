"""`coala-stream reduce`: fold each stored input into its triangular factor R (streaming TSQR)."""

from ._common import add_parser, not_implemented


def register(subparsers) -> None:
    p = add_parser(subparsers, "reduce", "fold each stored input into its triangular factor R (streaming TSQR)", "Fold each stored input into its triangular factor R (streaming TSQR).\n\nNot implemented yet (issue 5).")
    p.set_defaults(func=not_implemented("reduce", "issue 5"))
