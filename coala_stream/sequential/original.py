"""The original model's rows of one block from one pass (`OriginalRows`, issue 25).

With ``--objective output`` every group of block k needs the ORIGINAL block's input to
that group (the X of its pair [Xh | X]), and block k+1 needs the original block's
output. The original block never changes while block k is compressed, so instead of
running it once per group up to that group and once more to its end, the first group's
capture pass runs it to its end once per batch and keeps, per batch, every later
group's input and the block's output in memory; later groups and the original pass
take them from there. The operations that produce a kept tensor are the ones the
per-group pass would run (the same block, weights and batch, up to the same module),
so the bits are the same: a batch that is not kept (after a resume, or when the rows
would exceed ``budget`` bytes) is recomputed the old way with the same result.
"""

from __future__ import annotations

import torch

from ..capture import StopForward, linear_input

OUTPUT = "<output>"
BUDGET = 1 << 30  # bytes of kept rows per block; beyond it the per-group passes run as before


class OriginalRows:
    """Per-batch tensors of one block's original pass: {(group name or OUTPUT, batch start): t}."""

    def __init__(self, names: list[str], widths: list[int], hidden: int, tokens: int,
                 itemsize: int, budget: int | None = None):
        # hidden: the width of the block's output kept beside them (0: the output is not kept)
        self.names = names  # the groups in forward order
        need = tokens * (sum(widths[1:]) + hidden) * itemsize
        self.enabled = bool(names) and need <= (BUDGET if budget is None else budget)
        self.rows: dict[tuple[str, int], torch.Tensor] = {}

    def take(self, name: str, s: int) -> torch.Tensor | None:
        return self.rows.pop((name, s), None)

    def has_outputs(self, starts) -> bool:
        return all((OUTPUT, s) in self.rows for s in starts)

    def clear(self) -> None:
        self.rows.clear()

    def fill(self, run_block, modules: dict[str, torch.nn.Module], first: str, s: int,
             x: torch.Tensor, with_output: bool) -> torch.Tensor:
        """The input of group ``first`` for batch ``s`` (block input ``x``, the block running
        with its original weights through ``run_block``); the inputs of the groups after it
        and (``with_output``) the block's output are kept for batch ``s``."""
        later = self.names[self.names.index(first):]
        got: dict[str, torch.Tensor] = {}

        def hook(name):
            def pre_hook(mod, args, kwargs):
                got[name] = linear_input(args, kwargs).clone()  # later ops run: keep it safe
                if name == later[-1] and not with_output:
                    raise StopForward
            return pre_hook

        handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in later]
        try:
            out = run_block(x)
        finally:
            for h in handles:
                h.remove()
        for name in later[1:]:
            self.rows[(name, s)] = got[name]
        if with_output and out is not None:
            self.rows[(OUTPUT, s)] = out
        return got[first]
