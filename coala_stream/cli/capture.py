"""`coala-stream capture`: run a model over calibration text and store every distinct linear-layer input."""

from ._common import add_parser, not_implemented


def register(subparsers) -> None:
    p = add_parser(subparsers, "capture", "run a model over calibration text and store every distinct linear-layer input", "Run a model over calibration text and store every distinct linear-layer input.\n\nNot implemented yet (issue 4).")
    p.set_defaults(func=not_implemented("capture", "issue 4"))
