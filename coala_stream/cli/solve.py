"""`coala-stream solve`: compute low-rank factors per layer and write a compressed model or LoRA adapters."""

from ._common import add_parser, not_implemented


def register(subparsers) -> None:
    p = add_parser(subparsers, "solve", "compute low-rank factors per layer and write a compressed model or LoRA adapters", "Compute low-rank factors per layer and write a compressed model or LoRA adapters.\n\nNot implemented yet (issue 6).")
    p.set_defaults(func=not_implemented("solve", "issue 6"))
