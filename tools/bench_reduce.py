"""Reduce benchmark: fold vs Gram throughput, reduce vs read time, peak RSS vs store size.

Not a test: it prints markdown tables for docs/benchmarks.md ("Reduce").

1. Fold vs Gram: a stream of float32 blocks (t x n) folded into R with
   ``linalg.fold_block`` (QR of [R; X]) against the Gram accumulation peers use
   (``G += X^T X``), same device, dtype and blocks. Seconds per block, GB/s of
   float32 input, and the ratio.
2. Reduce vs read: a bf16 store of synthetic activations (n, chunk_tokens as
   capture's default). Times: reading + decompressing every chunk (serially,
   and with the reduce prefetcher's threads), folding the same chunks from
   memory (the reduce loop's groups, no I/O), and ``run_reduce`` end to end.
   Files are in the page cache (just written): this is decompression, not disk.
3. Peak RSS: ``run_reduce`` in a fresh subprocess on a store of S tokens and one
   of 4 S tokens; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the run,
   and after the imports alone (the baseline).

    .venv/bin/python tools/bench_reduce.py                      # everything (~ a few minutes)
    .venv/bin/python tools/bench_reduce.py --only fold --ns 576 --ts 4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from coala_stream.linalg import fold_block
from coala_stream.reduce import ChunkPrefetcher, Partial, ReduceConfig, fold_group, group_chunks, plan_groups, run_reduce
from coala_stream.store import create_store, open_store


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), load average at start {load}")


# -- 1. fold vs Gram -------------------------------------------------------------------------------


def bench_fold_vs_gram(ns, ts, blocks: int, device: str) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in ns:
        for t in ts:
            X = [torch.randn(t, n, generator=g).to(device) for _ in range(blocks)]
            fold_block(None, X[0][: 2 * n])  # warm-up (library init, allocator)
            torch.zeros(n, n, device=device).addmm_(X[0].T, X[0])
            fold_s = _timed(lambda: _fold_stream(X), device)
            gram_s = _timed(lambda: _gram_stream(X, n, device), device)
            gb = blocks * t * n * 4 / 1e9
            rows.append({"n": n, "t": t, "blocks": blocks, "fold_s_per_block": fold_s / blocks,
                         "gram_s_per_block": gram_s / blocks, "fold_gbs": gb / fold_s,
                         "gram_gbs": gb / gram_s, "ratio": fold_s / gram_s})
            print(f"  fold vs gram n={n} t={t}: {fold_s / blocks:.3f} s vs {gram_s / blocks:.3f} s "
                  f"per block ({fold_s / gram_s:.2f}x)", file=sys.stderr)
    return rows


def _fold_stream(X):
    R = None
    for block in X:
        R = fold_block(R, block)
    return R


def _gram_stream(X, n, device):
    G = torch.zeros(n, n, device=device)
    for block in X:
        G.addmm_(block.T, block)
    return G


def _timed(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# -- 2. reduce vs read ---------------------------------------------------------------------------------


def make_store(path: Path, n: int, tokens: int, chunk_tokens: int, seed: int = 0) -> None:
    """bf16 store of synthetic activations: Gaussian columns of spread scales, a few outlier columns."""
    store = create_store(path, "zarr", {"dtype": "bfloat16", "chunk_tokens": chunk_tokens})
    store.create_input("x", n, ["x"])
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, n)
    scale[torch.randperm(n, generator=g)[: max(1, n // 100)]] = 30.0  # outlier features, as in LLMs
    crcs = []
    for i in range(-(-tokens // chunk_tokens)):
        rows = min(chunk_tokens, tokens - i * chunk_tokens)
        crcs.append(store.write_chunk("x", i, (torch.randn(rows, n, generator=g) * scale).bfloat16()))
    store.commit(1, {"x": (tokens, crcs)}, complete=True)
    store.close()


def bench_reduce_vs_read(path: Path, n: int, read_threads: int, prefetch: int) -> dict:
    store = open_store(path)
    info = store.input("x")
    t0 = time.perf_counter()
    chunks = [store.read_chunk("x", i) for i in range(info.num_chunks)]
    read_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ChunkPrefetcher(lambda i: store.read_chunk("x", i), 0, info.num_chunks, depth=prefetch,
                         threads=read_threads) as it:
        for _ in it:
            pass
    read_threaded = time.perf_counter() - t0
    g = group_chunks(n, info.chunk_tokens, None)
    part = Partial.empty(n, torch.device("cpu"), False)
    t0 = time.perf_counter()
    for a, b in plan_groups(0, info.num_chunks, g):
        fold_group(part, [(i, chunks[i]) for i in range(a, b)], name="x", n=n, dtype=torch.float32,
                   device=torch.device("cpu"))
    fold_mem = time.perf_counter() - t0
    del chunks
    store.close()
    cfg = ReduceConfig(device="cpu", restart=True, read_threads=read_threads, prefetch=prefetch)
    t0 = time.perf_counter()
    run_reduce(path, cfg, progress=False)
    wall = time.perf_counter() - t0
    raw = info.tokens * n * 2
    stored = sum(f.stat().st_size for f in (path / "inputs").rglob("*") if f.is_file())
    return {"tokens": info.tokens, "n": n, "chunk_tokens": info.chunk_tokens, "group_chunks": g,
            "raw_gb": raw / 1e9, "stored_gb": stored / 1e9, "read_serial_s": read_serial,
            "read_threaded_s": read_threaded, "fold_mem_s": fold_mem, "reduce_s": wall,
            "ratio": wall / max(read_threaded, fold_mem)}


# -- 3. peak RSS ------------------------------------------------------------------------------------------


# Peak RSS of the child alone. Linux keeps ru_maxrss across exec (the forked copy of
# this big parent counts), so getrusage in the child over-reports; VmHWM in
# /proc/self/status belongs to the new address space. Both are printed.
CHILD = """
import json, resource, sys
import torch
from coala_stream.reduce import ReduceConfig, run_reduce
from coala_stream.store import open_store

def hwm_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

base = hwm_kb()
threads = int(sys.argv[2]) if sys.argv[2] != "None" else None
s = run_reduce(sys.argv[1], ReduceConfig(device="cpu", restart=True, threads=threads), progress=False)
print(json.dumps({"base_kb": base, "peak_kb": hwm_kb(), "seconds": s["seconds"],
                  "getrusage_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def bench_rss(path: Path, threads: int | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- main ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("fold", "read", "rss"), action="append",
                    help="run only these parts (repeatable); default: all")
    ap.add_argument("--ns", default="576,1536", help="widths for fold vs Gram")
    ap.add_argument("--ts", default="4096,16384", help="block rows for fold vs Gram")
    ap.add_argument("--blocks", type=int, default=4, help="blocks per stream")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--store-n", type=int, default=576, help="width of the benchmark store")
    ap.add_argument("--store-tokens", type=int, default=65536, help="S: tokens of the small store")
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    ap.add_argument("--read-threads", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--workdir", help="where to build the stores (default: a temporary directory)")
    ap.add_argument("--reuse", action="store_true", help="reuse stores already in --workdir")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.only or ("fold", "read", "rss"))
    print(f"machine: {machine()}\n")

    if "fold" in parts:
        rows = bench_fold_vs_gram([int(x) for x in args.ns.split(",")],
                                  [int(x) for x in args.ts.split(",")], args.blocks, args.device)
        print(f"fold vs Gram ({args.device}, float32, {args.blocks} blocks per stream)\n")
        print("| n | t (rows/block) | fold s/block | Gram s/block | fold GB/s | Gram GB/s | fold / Gram |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['n']} | {r['t']} | {r['fold_s_per_block']:.3f} | {r['gram_s_per_block']:.3f} | "
                  f"{r['fold_gbs']:.3f} | {r['gram_gbs']:.3f} | {r['ratio']:.2f}x |")
        print()

    if parts & {"read", "rss"}:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-reduce-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            small, large = work / "S.zarr", work / "4S.zarr"
            for path, tokens in ((small, args.store_tokens), (large, 4 * args.store_tokens)):
                if ("rss" in parts or path == small) and not (args.reuse and path.exists()):
                    shutil.rmtree(path, ignore_errors=True)
                    t0 = time.perf_counter()
                    make_store(path, args.store_n, tokens, args.chunk_tokens)
                    print(f"  built {path.name}: {tokens} tokens in {time.perf_counter() - t0:.1f} s",
                          file=sys.stderr)
            if "read" in parts:
                r = bench_reduce_vs_read(small, args.store_n, args.read_threads, args.prefetch)
                print(f"reduce vs read (bf16 store, n={r['n']}, {r['tokens']} tokens, chunks of "
                      f"{r['chunk_tokens']}, {r['group_chunks']} chunk(s) per fold, "
                      f"{r['raw_gb']:.3f} GB raw / {r['stored_gb']:.3f} GB stored)\n")
                print("| read+decompress, serial | read+decompress, prefetcher | fold from memory | "
                      "reduce (end to end) | reduce / max(read, fold) |")
                print("|---:|---:|---:|---:|---:|")
                print(f"| {r['read_serial_s']:.2f} s ({r['raw_gb'] / r['read_serial_s']:.3f} GB/s) | "
                      f"{r['read_threaded_s']:.2f} s ({r['raw_gb'] / r['read_threaded_s']:.3f} GB/s) | "
                      f"{r['fold_mem_s']:.2f} s ({r['raw_gb'] / r['fold_mem_s']:.3f} GB/s) | "
                      f"{r['reduce_s']:.2f} s ({r['raw_gb'] / r['reduce_s']:.3f} GB/s) | {r['ratio']:.2f}x |")
                print()
            if "rss" in parts:
                print(f"peak RSS of `run_reduce` (fresh process, n={args.store_n}, chunks of "
                      f"{args.chunk_tokens}, prefetch {args.prefetch})\n")
                print("| store | tokens | raw GB | VmHWM after imports | VmHWM peak | peak - imports | "
                      "(ru_maxrss, inflated) | reduce s |")
                print("|---|---:|---:|---:|---:|---:|---:|---:|")
                for label, path, tokens in (("S", small, args.store_tokens), ("4S", large, 4 * args.store_tokens)):
                    m = bench_rss(path, args.threads)
                    print(f"| {label} | {tokens} | {tokens * args.store_n * 2 / 1e9:.3f} | "
                          f"{m['base_kb'] / 1024:.0f} MiB | {m['peak_kb'] / 1024:.0f} MiB | "
                          f"{(m['peak_kb'] - m['base_kb']) / 1024:.0f} MiB | "
                          f"{m['getrusage_kb'] / 1024:.0f} MiB | {m['seconds']:.1f} |")
                print()
        finally:
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
