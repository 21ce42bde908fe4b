"""Fold vs Gram benchmark (issue 8): the cost of folding a stream of row blocks into R.

Not a test: it prints a markdown table for docs/benchmarks.md ("Fold vs Gram").

For each dtype, n and t, a stream of ``--blocks`` random blocks X (t x n) is
processed by three variants, starting from the same state:

* old:  ``R = canonical(qr(cat([R, X])).R)``, the fold before issue 8
        (a Householder QR of the whole stack, ~2 (n + t) n^2 flops);
* new:  ``linalg.fold_block(R, X)`` as it is now (on CPU for n >= 256: the
        panel fold under R, ~2 t n^2 flops);
* gram: ``G.addmm_(X.T, X)``, the Gram accumulation peers use (2 t n^2 flops).

Old and new start from the n x n R of a warm-up block (the steady state of a
stream), Gram from zeros. The machine this was written for is shared and
noisy, so the variants run interleaved: each repetition runs every variant's
whole stream once, in a rotating order, and the table shows the minimum and
the median over repetitions of the seconds per block, and the ratios
min/min and the median of the per-repetition ratios (each taken between runs
a few seconds apart, so load drift cancels in part). The last column is the
same ratio (min/min) of process CPU time (``time.process_time``): with
``--threads 1`` it counts the work done rather than the time slices lost to
other processes, so it is the steadier number on a busy machine.

    .venv/bin/python tools/bench_fold.py --threads 1
    .venv/bin/python tools/bench_fold.py --threads 1 --ns 576 --dtypes float32 --panels 32,48,64,96,128
    .venv/bin/python tools/bench_fold.py --threads 1 --ns 1152 2112 3072 --dtypes float32 --panels 64/64,64/128,64/256
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from coala_stream.linalg import _canonical, _fold_under_r, fold_block

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def old_fold(R: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """fold_block before issue 8: one QR of the concatenated stack."""
    stacked = X if R is None else torch.cat([R, X])
    return _canonical(torch.linalg.qr(stacked, mode="r").R)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(args) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}, "
            f"torch.get_num_threads() = {torch.get_num_threads()}; device {args.device}; "
            f"load average at start (1, 5, 15 min): {load}")


def sizes(n: int, args) -> list[int]:
    """Rows per block for this n: the multiples of n, then the absolute sizes."""
    ts = [m * n for m in args.t_mult]
    ts += [t for t in args.t_abs if t not in ts]
    if n >= args.big_n:
        ts = [m * n for m in args.big_t_mult]
    return ts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_case(dtype, n: int, t: int, blocks: int, reps: int, panels: list[int], device: str) -> dict:
    g = torch.Generator().manual_seed(n + t)
    X = [torch.randn(t, n, generator=g, dtype=dtype).to(device) for _ in range(blocks)]
    R0 = old_fold(None, torch.randn(max(t, n), n, generator=g, dtype=dtype).to(device))

    def stream(fold):
        def go():
            R = R0
            for block in X:
                R = fold(R, block)
            return R
        return go

    def gram():
        G = torch.zeros(n, n, dtype=dtype, device=device)
        for block in X:
            G.addmm_(block.T, block)
        return G

    variants = {"gram": gram, "old": stream(old_fold), "new": stream(fold_block)}
    for spec in panels:  # "b" or "b/outer" (the two-level fold's block width)
        b, _, o = str(spec).partition("/")
        kw = {"outer": int(o)} if o else {}
        variants[f"b={spec}"] = stream(
            lambda R, Xb, b=int(b), kw=kw: _canonical(_fold_under_r(R, Xb, b, **kw)))
    names = list(variants)
    for name in names:  # warm-up: allocator, MKL init, page faults
        variants[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / blocks)
            cpu[name].append((time.process_time() - start_cpu) / blocks)
    return {"times": times, "cpu": cpu, "load": os.getloadavg()[0]}


def fmt_row(dtype_name: str, n: int, t: int, blocks: int, reps: int, result: dict) -> str:
    times = result["times"]
    gram = times["gram"]

    def s(name):
        return f"{min(times[name]):.4f} / {statistics.median(times[name]):.4f}"

    def ratio(name, base="gram"):
        per_rep = [a / b for a, b in zip(times[name], times[base])]
        return f"{min(times[name]) / min(times[base]):.2f}x / {statistics.median(per_rep):.2f}x"

    gflops = 2 * t * n * n / min(gram) / 1e9
    extra = [name for name in times if name.startswith("b=")]
    cells = [dtype_name, str(n), str(t), str(blocks), str(reps), f"{result['load']:.1f}", s("gram"),
             f"{gflops:.0f}", s("old"), s("new"), ratio("old"), f"**{ratio('new')}**", ratio("new", "old")]
    cpu = result["cpu"]
    cells += [f"{ratio(name)} (cpu {min(cpu[name]) / min(cpu['gram']):.2f}x)" for name in extra]
    cells.append(f"{min(cpu['old']) / min(cpu['gram']):.2f}x / {min(cpu['new']) / min(cpu['gram']):.2f}x")
    return "| " + " | ".join(cells) + " |"


def table_header(panels: list[int]) -> str:
    cols = ["dtype", "n", "t", "blocks", "reps", "load 1m", "gram s/block min / med", "gram GF/s",
            "old s/block min / med", "new s/block min / med", "old/gram min / med",
            "new/gram min / med", "new/old min / med"]
    cols += [f"b={b} /gram min / med" for b in panels]
    cols += ["CPU-time old/gram / new/gram (min)"]
    return "| " + " | ".join(cols) + " |\n|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice); 1 is steadier on a shared machine")
    p.add_argument("--ns", type=int, nargs="+", default=[576, 1536, 4096], help="columns n (default: 576 1536 4096)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32", "float64"])
    p.add_argument("--t-mult", type=int, nargs="+", default=[2, 4, 8],
                   help="rows per block as multiples of n (default: 2 4 8)")
    p.add_argument("--t-abs", type=int, nargs="*", default=[4096, 16384],
                   help="rows per block, absolute (default: 4096 16384); not for n >= --big-n")
    p.add_argument("--big-n", type=int, default=4096, help="n from which runs are kept short (default 4096)")
    p.add_argument("--big-t-mult", type=int, nargs="+", default=[2],
                   help="rows per block as multiples of n for n >= --big-n (default: 2)")
    p.add_argument("--blocks", type=int, default=4, help="blocks per stream (default 4; 2 for n >= --big-n)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5; 3 for n >= --big-n)")
    p.add_argument("--max-gb", type=float, default=2.0,
                   help="skip a case whose blocks take more than this many GB (default 2)")
    p.add_argument("--panels", default="", help="also time _fold_under_r with these panel widths, "
                   "e.g. 32,64,128, or panel/outer block widths, e.g. 64/64,64/128,64/256")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    panels = [b.strip() for b in args.panels.split(",") if b.strip()]

    print("## Fold vs Gram\n")
    print(header(args) + "\n")
    print(f"Command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`\n")
    print("Seconds per block (min / median over interleaved repetitions); ratios: min/min and the median "
          "of per-repetition ratios. old = QR of cat([R, X]); new = fold_block; gram = G.addmm_(X.T, X).\n")
    print(table_header(panels), flush=True)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for n in args.ns:
            big = n >= args.big_n
            blocks = min(args.blocks, 2) if big else args.blocks
            reps = min(args.reps, 3) if big else args.reps
            for t in sizes(n, args):
                gb = blocks * t * n * dtype.itemsize / 1e9
                if gb > args.max_gb:
                    print(f"skipped {dtype_name} n={n} t={t}: {gb:.1f} GB of blocks > --max-gb", file=sys.stderr)
                    continue
                result = run_case(dtype, n, t, blocks, reps, panels, args.device)
                print(fmt_row(dtype_name, n, t, blocks, reps, result), flush=True)
    print(f"\nload average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
