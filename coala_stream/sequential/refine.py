"""Block refinement (``--refine-steps N``): a few Adam steps on a compressed block's factors.

After every group of block k is compressed, the factors A, B of its linears are trained
so that the compressed block's output on the compressed model's hidden states matches
the ORIGINAL block's output on the original hidden states (AA-SVD's refinement: mean
squared error, Adam). Everything else in the block stays frozen. The batches are the
capture's, taken in order and cycled, from the two streams on disk, so a run killed
during refinement redoes it from the same pre-refinement factors and ends with the
same result (on the same device, torch build and thread count).

Cost: N forward and backward passes of one block on one batch; memory: one block,
its activations for one batch, and Adam's two moments of A and B.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from .blocks import BlockModel
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
        with torch.enable_grad():
            overrides = {name[len(head):] + ".weight": (A @ B).to(dtypes[name])
                         for name, (A, B) in params.items()}
            out = functional_call(block, overrides, (x, *args), kwargs)
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.mse_loss(out.to(torch.float32), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {name: (A.detach(), B.detach()) for name, (A, B) in params.items()}
