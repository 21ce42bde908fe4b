"""One refinement step of a SmolLM2-135M block, dense W = A B against the factors (issue 25).

Block 0 of the embedded SmolLM2-135M (or ``--model``), its seven linears given random
factors of the uniform rank of ``--ratio`` (r = (1 - ratio) m n / (m + n)), one batch of
``--batch`` x ``--seq-len`` random hidden states: ``--steps`` Adam steps as
``sequential.refine`` ran them before issue 25 (W = A B rebuilt, the dense block run
through ``functional_call``) and as it runs them now (``refine.on_factors``), CPU seconds
of each (one thread by default), best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from torch.func import functional_call

    from coala_stream import models
    from coala_stream.sequential.refine import on_factors

    torch.set_num_threads(args.threads)
    model = models.load_model(models.ModelSpec.from_args(args.model), "float32", progress=False)
    base = model.model
    block = base.layers[0]
    head = "model.layers.0."
    g = torch.Generator().manual_seed(0)
    shapes = {head + n: (m.out_features, m.in_features) for n, m in block.named_modules()
              if isinstance(m, torch.nn.Linear)}
    ranks = {n: int((1 - args.ratio) * m * k / (m + k)) for n, (m, k) in shapes.items()}
    x = torch.randn(args.batch, args.seq_len, model.config.hidden_size, generator=g)
    y = torch.randn(x.shape, generator=g)
    pos = torch.arange(args.seq_len).unsqueeze(0).expand(args.batch, -1)
    pe = base.rotary_emb(x, pos)

    def steps(factorized: bool) -> float:
        params = {n: (torch.randn(m, ranks[n], generator=g).div(ranks[n] ** 0.5).requires_grad_(),
                      torch.randn(ranks[n], k, generator=g).div(k ** 0.5).requires_grad_())
                  for n, (m, k) in shapes.items()}
        opt = torch.optim.Adam([t for ab in params.values() for t in ab], lr=1e-4)
        c0 = cpu()
        for _ in range(args.steps):
            if factorized:
                with on_factors(block, head, params, {n: torch.float32 for n in params}):
                    out = block(x, position_embeddings=pe)
            else:
                over = {n[len(head):] + ".weight": A @ B for n, (A, B) in params.items()}
                out = functional_call(block, over, (x,), {"position_embeddings": pe})
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.mse_loss(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (cpu() - c0) / args.steps

    dense = min(steps(False) for _ in range(args.repeats))
    fact = min(steps(True) for _ in range(args.repeats))
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.1f}, block 0, ranks "
          f"{sorted(set(ranks.values()))}, batch {args.batch} x {args.seq_len}")
    print(f"CPU s per step: dense W = A B {dense:.3f}, on the factors {fact:.3f} "
          f"({dense / fact:.2f}x)")


if __name__ == "__main__":
    main()
