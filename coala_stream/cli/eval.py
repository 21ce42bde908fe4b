"""`coala-stream eval`: perplexity of a model or a solve output on non-overlapping windows of a text."""

from ._common import add_parser, not_implemented


def register(subparsers) -> None:
    p = add_parser(subparsers, "eval", "perplexity of a model or a solve output on non-overlapping windows of a text", "Perplexity of a model or a solve output on non-overlapping windows of a text.\n\nNot implemented yet (issue 7).")
    p.set_defaults(func=not_implemented("eval", "issue 7"))
