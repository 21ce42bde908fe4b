"""Block refinement (``--refine-steps N``): a few Adam steps on a compressed block's factors.

After every group of block k is compressed, the factors A, B of its linears are trained
so that the compressed block's output on the compressed model's hidden states matches
the ORIGINAL block's output on the original hidden states (AA-SVD's refinement: mean
squared error, Adam). Everything else in the block stays frozen. The batches are the
capture's, taken in order and cycled, from the two streams on disk, so a run killed
during refinement redoes it from the same pre-refinement factors and ends with the
same result (on the same device, torch build and thread count).

The block runs on the factors themselves: each compressed linear computes
``(x B^T) A^T + bias`` (`_OnFactors`), never W = A B, so a step costs the compressed
block's flops (r (m + n) per token and linear instead of m n) and no m x n product or
its gradient. Mathematically the same as the dense ``x (A B)^T``; the float32 rounding
differs (the refined factors agree with a dense-weight refinement to rounding only).

Cost: N forward and backward passes of one block on one batch; memory: one block,
its activations for one batch, and Adam's two moments of A and B.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..blocks import BlockModel
from .workdir import WorkDir


def refine_block(bm: BlockModel, k: int, bw, work: WorkDir, src: str, target: str, steps: int,
                 lr: float, batch: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors of block ``k`` (``bw.factors``) after ``steps`` Adam steps at rate ``lr``;
    ``src`` holds the block's compressed-model inputs, ``target`` the original block's
    outputs (both arrays of ``work``). Returns {module: (A, B)} in float32."""
    head = f"{bm.prefix}.{k}."
    block = bm.blocks[k]
    params = {name: (A.detach().to(bm.device, torch.float32).clone().requires_grad_(True),
                     B.detach().to(bm.device, torch.float32).clone().requires_grad_(True))
              for name, (A, B) in bw.factors.items()}
    dtypes = {name: bw.original[name].dtype for name in params}
    opt = torch.optim.Adam([t for ab in params.values() for t in ab], lr=lr)
    starts = list(range(0, work.samples, batch))
    for step in range(steps):
        s = starts[step % len(starts)]
        x = work.read(src, s, s + batch).to(bm.device)
        y = work.read(target, s, s + batch).to(bm.device, torch.float32)
        args, kwargs = bm.layer_args(k, x.shape[0], x.shape[1])
        with torch.enable_grad(), on_factors(block, head, params, dtypes):
            out = block(x, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.mse_loss(out.to(torch.float32), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {name: (A.detach(), B.detach()) for name, (A, B) in params.items()}


class _OnFactors(torch.nn.Module):
    """A linear run on its factors: ``(x B^T) A^T + bias`` (A, B cast to the block's dtype)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias, dtype: torch.dtype):
        super().__init__()
        self.A, self.B, self.bias_, self.dtype = A, B, bias, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.linear(x, self.B.to(self.dtype))
        return torch.nn.functional.linear(h, self.A.to(self.dtype), self.bias_)


@contextmanager
def on_factors(block: torch.nn.Module, head: str, params: dict, dtypes: dict):
    """Inside: block's linears named in ``params`` ({module: (A, B)}, names starting with
    ``head``) replaced by `_OnFactors` of those tensors (gradients flow to them); the
    original modules are put back on exit."""
    swapped = []
    try:
        for name, (A, B) in params.items():
            owner, _, attr = name[len(head):].rpartition(".")
            parent = block.get_submodule(owner) if owner else block
            old = getattr(parent, attr)
            setattr(parent, attr, _OnFactors(A, B, old.bias, dtypes[name]))
            swapped.append((parent, attr, old))
        yield
    finally:
        for parent, attr, old in reversed(swapped):
            setattr(parent, attr, old)
