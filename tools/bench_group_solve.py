"""The per-group solve of the output objective at a model's widths (issue 25's cost model).

The propagating capture solves each group from R_full of its pair ([Xh | X], or [Xh | X W^T]
for down_proj) with `objective.OutputProblem`: an SVD of (R12 or R11 W^T) per layer, and once
per input either a triangular solve with R11 (in float64 when cond(R11) * 10 >= 1 / (n eps),
~93 for n = 8960 in float32, but cond(R11) * 2 < 1 / (n eps)) or, when R11 is more
ill-conditioned than that or has fewer rows than columns (fewer tokens than features), a full
SVD of R11. This script times one decoder block's groups
of a Qwen2-shaped model (``--hidden``, ``--intermediate``, ``--kv``) on a synthetic upper
triangular R_full with a prescribed condition number of R11 (its diagonal spread
logarithmically over ``--cond``; the rest small noise), for each ``--tokens`` (the rows of R:
min(tokens, width)), at the uniform rank of ``--ratio``: which path each input takes and the
CPU seconds of each group. One JSON line per (tokens, cond, group).

    OMP_NUM_THREADS=1 python tools/bench_group_solve.py --tokens 4096 16384 --cond 50 1e4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def synthetic_r(rows: int, n: int, width: int, cond: float, seed: int):
    """Upper trapezoidal rows x width; its first n columns R11 with cond ~ ``cond`` (square)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), min(rows, n))
    # R11 = D (I + N) with ||N|| ~ 0.3: cond(R11) within ~2x of cond(D) (a random triangle
    # with O(1) entries is exponentially ill-conditioned in n, and would always take the SVD)
    R = torch.randn(rows, width, generator=g).triu_(1) * (0.15 / width ** 0.5)
    R[:, :n] *= d.unsqueeze(1) if rows <= n else torch.cat([d, d[-1:].expand(rows - n)]).unsqueeze(1)
    idx = torch.arange(min(rows, n))
    R[idx, idx] = d
    return R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--kv", type=int, default=256)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--cond", type=float, nargs="+", default=[50.0, 1e4])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--groups", nargs="+", default=["attn", "o", "mlp", "down"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-float64-solve", action="store_true",
                    help="R11's SVD wherever the float32 triangular solve is not accurate (the "
                         "code before the float64 solve), for a pair in one run")
    args = ap.parse_args()

    import torch

    from coala_stream import objective
    from coala_stream.objective import OutputProblem

    if args.no_float64_solve:
        objective._RANGE_SAFETY = float("inf")  # no cond passes: the SVD, as before 736f1c4
    torch.set_num_threads(args.threads)
    h, f, kv = args.hidden, args.intermediate, args.kv
    # group -> (input width n, consumers' output widths, narrow pair)
    groups = {"attn": (h, [h, kv, kv], False), "o": (h, [h], False),
              "mlp": (h, [f, f], False), "down": (f, [h], True)}
    for tokens in args.tokens:
        for cond in args.cond:
            for name in args.groups:
                n, outs, narrow = groups[name]
                width = n + (sum(outs) if narrow else n)
                R = synthetic_r(min(tokens, width), n, width, cond, seed=len(name))
                problem = OutputProblem(R, n, args.alpha, outputs=outs if narrow else None)
                g = torch.Generator().manual_seed(1)
                c0, first, row = cpu(), None, 0
                for m in outs:
                    W = torch.randn(m, n, generator=g) / n ** 0.5
                    rank = max(1, int((1 - args.ratio) * m * n / (m + n)))
                    cols = slice(row, row + m) if narrow else None
                    row += m
                    problem.factors(W, rank, cols=cols)
                    first = cpu() - c0 if first is None else first
                print(json.dumps({"tokens": tokens, "cond": cond, "group": name, "n": n,
                                  "outputs": outs, "rows_of_R": R.shape[0],
                                  "path": problem.path(),
                                  "cpu_s": round(cpu() - c0, 2),
                                  "first_layer_cpu_s": round(first, 2),
                                  "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
