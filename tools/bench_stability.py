"""Stability study: how far each solver lands from the float64 optimum as cond(X) grows.

In the spirit of Figure 1 of the COALA paper. For X (N x n) with prescribed
singular values (log-spaced from 1 down to 1/cond, random orthogonal singular
vectors) and a weight W (m x n), every method computes a rank-r W' and we
report its excess error over the optimum,

    (||X (W - W')^T||_F - e_opt) / e_opt,

where e_opt comes from COALA in float64 on X itself (the exact minimiser:
tail of the singular values of W R^T), and the errors are evaluated in float64.

Methods (data in float32, as it comes from a model, unless noted):
- coala fp32 / coala fp64: fold_r of the row blocks, SVD of W R^T.
- svdllm fp32: Gram X^T X accumulated in float32, Cholesky (damped on
  failure, as peers do), SVD of W S, multiply back by S^-1 (explicit inverse).
- svdllm fp32 Gram, fp64 Cholesky: the same Gram, factored in float64 (what
  SVD-LLM's code does).
- gram+pinv fp32: Gram in float32, eigendecomposition, whitening by its square
  root, multiply back by the pseudo-inverse (CorDA/EoRA-style).

A method that raises (e.g. Cholesky fails even with damping) or returns
NaN/Inf is drawn at the top of the plot as "failed".

With ``--store`` the same comparison runs on real captured activations (the
first chunks of a few inputs of a capture store; float64 reference from the
same rows).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch

from coala_stream import coala_factors, fold_r, svdllm_factors
from coala_stream.baselines import NumericalFallbackWarning

FAILED = 1e3  # where failures are drawn


def synthetic(n: int, rows: int, m: int, cond: float, seed: int,
              weights: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    X = (U * s) @ V.T
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    if weights == "balanced":
        # W reads X's weak directions as strongly as its strong ones (like a layer keyed to
        # rare outlier features): X W^T then has singular values decaying only as sqrt(s).
        W = (W @ V) / s.sqrt() @ V.T
    return X, W


def error(X64: torch.Tensor, W64: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    D = W64 - A.to(torch.float64) @ B.to(torch.float64)
    return float(torch.linalg.norm(X64 @ D.T))


def blocks(X: torch.Tensor, rows: int):
    return (X[i:i + rows] for i in range(0, X.shape[0], rows))


def gram_fp32(X32: torch.Tensor, rows: int) -> torch.Tensor:
    G = torch.zeros(X32.shape[1], X32.shape[1], dtype=torch.float32)
    for b in blocks(X32, rows):
        G.addmm_(b.T, b)
    return G


def gram_pinv_factors(W: torch.Tensor, G: torch.Tensor, rank: int):
    lam, Q = torch.linalg.eigh(G)
    root = lam.clamp(min=0).sqrt()
    keep = root > root.max() * root.shape[0] * torch.finfo(G.dtype).eps
    S = Q[:, keep] * root[keep]  # S S^T = G on its numerical range
    S_pinv = (Q[:, keep] / root[keep]).T
    U, sig, Vh = torch.linalg.svd(W.to(G.dtype) @ S, full_matrices=False)
    return U[:, :rank] * sig[:rank], Vh[:rank] @ S_pinv


def methods(X64: torch.Tensor, W64: torch.Tensor, rank: int, rows: int) -> dict[str, float]:
    """Relative excess error of each method over the float64 optimum (inf when it failed)."""
    X32, W32 = X64.float(), W64.float()
    A, B = coala_factors(W64, fold_r(blocks(X64, rows), dtype=torch.float64), rank)
    e_opt = error(X64, W64, A, B)
    G32 = gram_fp32(X32, rows)
    runs = {
        "coala fp32": lambda: coala_factors(W32, fold_r(blocks(X32, rows), dtype=torch.float32), rank),
        "coala fp64": lambda: coala_factors(W64, fold_r(blocks(X32, rows), dtype=torch.float64), rank),
        "svdllm fp32": lambda: svdllm_factors(W32, G32, rank, dtype=torch.float32),
        "svdllm fp32 Gram, fp64 Cholesky": lambda: svdllm_factors(W32, G32, rank, dtype=torch.float64),
        "gram+pinv fp32": lambda: gram_pinv_factors(W32, G32, rank),
    }
    out = {}
    for name, run in runs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NumericalFallbackWarning)
                A, B = run()
            e = error(X64, W64, A, B)
            out[name] = (e - e_opt) / e_opt if math.isfinite(e) else math.inf
        except torch.linalg.LinAlgError:
            out[name] = math.inf
    out["_e_opt"] = e_opt
    return out


def real_inputs(store_path: Path, model_dir: Path | None, pattern: str, max_rows: int):
    """(name, consumer, X in float64, W) for the inputs matching ``pattern``, with their first
    consumer's W."""
    import re

    from coala_stream import open_store
    from coala_stream.weights import LazyWeights

    store = open_store(store_path)
    weights = LazyWeights(model_dir or Path(store.attrs["model"]["path"]))
    for name in [nm for nm in store.inputs if re.search(pattern, nm)]:
        parts, rows = [], 0
        for chunk in store.iter_chunks(name):
            parts.append(chunk.to(torch.float64))
            rows += chunk.shape[0]
            if rows >= max_rows:
                break
        X = torch.cat(parts)[:max_rows]
        consumer = store.input(name).consumers[0]
        yield name, consumer, X, weights.get(consumer + ".weight").to(torch.float64)


def store_consumers(store_path: Path, name: str) -> list[str]:
    from coala_stream import open_store

    return open_store(store_path).input(name).consumers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="features (columns of X)")
    ap.add_argument("--rows", type=int, default=1024, help="tokens (rows of X)")
    ap.add_argument("--m", type=int, default=256, help="rows of W")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--block", type=int, default=512, help="rows per streamed block")
    ap.add_argument("--conds", type=float, nargs="+", default=[10.0 ** k for k in range(0, 13)])
    ap.add_argument("--seeds", type=int, default=3, help="matrices per condition number (median shown)")
    ap.add_argument("--store", type=Path, help="also run on real activations from this capture store")
    ap.add_argument("--model-dir", type=Path,
                    help="safetensors model holding the store's weights (default: the store's model path)")
    ap.add_argument("--store-inputs", default=r"layers\.(0|15|29)\.",
                    help="regular expression choosing the store's inputs (default: every input of "
                         "the first, a middle and the last block)")
    ap.add_argument("--store-rows", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.2, help="rank for real layers (SVD-LLM convention)")
    ap.add_argument("--plot", type=Path, default=Path("docs/stability.png"))
    ap.add_argument("--json", type=Path, help="write all numbers here")
    args = ap.parse_args()

    synth = {}
    for family in ("random", "balanced"):
        rows_ = []
        for cond in args.conds:
            per_seed = [methods(*synthetic(args.n, args.rows, args.m, cond, seed, family), args.rank,
                                args.block) for seed in range(args.seeds)]
            row = {"cond": cond}
            for name in per_seed[0]:
                if not name.startswith("_"):
                    row[name] = sorted(r[name] for r in per_seed)[len(per_seed) // 2]
            rows_.append(row)
        synth[family] = rows_
        names = [k for k in rows_[0] if k != "cond"]
        print(f"\nsynthetic, {family} W: X {args.rows} x {args.n} (float32 data), W {args.m} x {args.n}, "
              f"rank {args.rank}, blocks of {args.block} rows, median of {args.seeds} seeds; relative "
              f"excess error over the float64 optimum (failed: raised or non-finite)\n")
        print("| cond(X) | " + " | ".join(names) + " |")
        print("|---:|" + "---:|" * len(names))
        for row in rows_:
            print(f"| {row['cond']:.0e} | " + " | ".join(_fmt(row[k]) for k in names) + " |")

    real = []
    if args.store:
        from coala_stream import rank_for_ratio

        print(f"\nreal activations from {args.store} (first {args.store_rows} rows of each input), "
              f"rank for --ratio {args.ratio}\n")
        print("| input (read by) | cond(X) | " + " | ".join(names) + " |")
        print("|---|---:|" + "---:|" * len(names))
        for name, consumer, X, W in real_inputs(args.store, args.model_dir, args.store_inputs, args.store_rows):
            rank = rank_for_ratio(*W.shape, args.ratio)
            s = torch.linalg.svdvals(X)
            cond = float(s[0] / s[-1]) if float(s[-1]) > 0 else math.inf
            res = methods(X, W, rank, args.block)
            real.append({"input": name, "consumer": consumer, "cond": cond, **res})
            readers = "/".join(c.rsplit(".", 1)[1] for c in store_consumers(args.store, name))
            print(f"| {name.rsplit('.', 1)[0]} ({readers}) | {cond:.1e} | "
                  + " | ".join(_fmt(res[k]) for k in names) + " |")

    if args.json:
        args.json.write_text(json.dumps({"synthetic": synth, "real": real, "args": vars(args)},
                                        default=str, indent=1))
    plot(synth, real, names, args)


def _fmt(v: float) -> str:
    return "failed" if not math.isfinite(v) else f"{v:.1e}"


def plot(synth, real, names, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    floor = 1e-12  # excess errors below this (rounding, or negative by rounding) sit on the floor

    def y(v):
        return FAILED if not math.isfinite(v) else max(v, floor)

    for ax, (family, rows) in zip(axes, synth.items()):
        for name, marker in zip(names, "osv^D"):
            line, = ax.plot([r["cond"] for r in rows], [y(r[name]) for r in rows], marker=marker,
                            label=name)
            if real and family == "random":
                ax.scatter([r["cond"] for r in real], [y(r[name]) for r in real], marker=marker, s=70,
                           facecolors="none", edgecolors=line.get_color())
        ax.axhline(FAILED, color="grey", lw=0.5, ls=":")
        ax.text(1.2, FAILED * 1.5, "failed", color="grey", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cond(X)")
        title = {"random": "Gaussian W", "balanced": "W weighting X's weak directions up (W V diag(s^-1/2) V^T)"}[family]
        if real and family == "random":
            title += "\nhollow: real SmolLM2 layer inputs (their own W)"
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("relative excess error over the float64 optimum")
    axes[0].legend(fontsize=8, loc="center left")
    axes[0].set_ylim(floor / 3, FAILED * 8)
    fig.suptitle(f"X {args.rows} x {args.n} in float32, rank {args.rank}, median of {args.seeds} seeds",
                 fontsize=10)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
