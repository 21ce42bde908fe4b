"""Capture's writer alone: how fast chunks are compressed and written, by writer threads.

No model runs. One chunk of every input (a "chunk set", what one commit covers) is
held in memory, either read from an existing store (``--source``: real activations,
their real compressibility) or made up (Gaussian columns with scales 1 to 0.01 and
1 % outlier columns, in the widths of ``--widths``), and written ``--sets`` times
through capture's own writer (`capture.ChunkWriter`: its queues, its input-to-thread
assignment, a commit per set) into a fresh zarr store, for each ``--writers`` count,
interleaved ``--repeats`` times (the minimum is reported).

Reports MB/s of raw activations, process CPU seconds per GB, and the compression
ratio. This is the rate a capture cannot exceed whatever the device: on a GPU node
the forward is fast and the writer is the limit.

    .venv/bin/python tools/bench_writer.py --source runs/quality/bf16.zarr --writers 1 2 4
    .venv/bin/python tools/bench_writer.py --dtype float32 --writers 1 2 --shard-chunks 1 4
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from coala_stream import capture
from coala_stream.store import create_store, open_store

SMOLLM2 = [576, 576, 576, 1536] * 30  # q/k/v, o, gate/up, down per block


def made_up(widths: list[int], rows: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in widths:
        scale = torch.logspace(0, -2, n)
        scale[torch.randperm(n, generator=g)[: max(1, n // 100)]] = 30
        out.append((torch.randn(rows, n, generator=g) * scale).to(dtype))
    return out


def from_store(path: Path) -> tuple[list[torch.Tensor], str, int]:
    with open_store(path) as s:
        chunks = [s.read_chunk(name, 0) for name in s.inputs]
        return chunks, s.attrs["dtype"], int(s.attrs["chunk_tokens"])


def write_sets(work: Path, chunks: list[torch.Tensor], dtype: str, rows: int, sets: int,
               writers: int, shard_chunks: int) -> tuple[float, float, int]:
    names = [f"in{i:03d}" for i in range(len(chunks))]
    path = work / f"w{writers}-s{shard_chunks}.zarr"
    store = create_store(path, "zarr", {"dtype": dtype, "chunk_tokens": rows}, shard_chunks=shard_chunks)
    try:
        for name, c in zip(names, chunks):
            store.create_input(name, c.shape[1], [name])
        crcs = {name: [] for name in names}
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        w = capture.ChunkWriter(store, crcs, {name: c.shape[1] for name, c in zip(names, chunks)},
                                chunks[0].element_size(), writers)
        try:
            for k in range(sets):
                for name, c in zip(names, chunks):
                    w.put(("chunk", name, k, c))
                w.put(("commit", k + 1, (k + 1) * rows, k + 1 == sets))
        finally:
            w.close()
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return wall, cpu, w.stored_bytes
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=None,
                    help="a store to take chunk 0 of every input from (default: made-up data)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="made-up data only (a --source store has its own)")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="made-up data: input widths (default: SmolLM2-135M's 120 inputs)")
    ap.add_argument("--rows", type=int, default=2048, help="made-up data: rows per chunk")
    ap.add_argument("--sets", type=int, default=8, help="chunk sets (commits) written per run")
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-chunks", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    if args.source:
        chunks, dtype, rows = from_store(args.source)
    else:
        dtype, rows = args.dtype, args.rows
        chunks = made_up(args.widths or SMOLLM2, rows, getattr(torch, dtype))
    raw = args.sets * sum(c.numel() * c.element_size() for c in chunks)
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench-writer-"))
    best: dict[tuple[int, int], tuple[float, float, int]] = {}
    try:
        for rep in range(args.repeats):
            for sc in args.shard_chunks:
                for w in args.writers:
                    got = write_sets(work, chunks, dtype, rows, args.sets, w, sc)
                    print(f"repeat {rep}: writers {w}, shard_chunks {sc}: {got[0]:.2f} s, "
                          f"cpu {got[1]:.2f} s", flush=True)
                    if (w, sc) not in best or got[0] < best[w, sc][0]:
                        best[w, sc] = got
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"data: {args.source or 'made up'}, {dtype}, {len(chunks)} inputs x {rows} rows, "
          f"{args.sets} sets, {raw / 1e6:.0f} MB raw per run; minimum of {args.repeats}\n")
    print("| writers | shard_chunks | s | MB/s raw | CPU s per GB | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (w, sc), (wall, cpu, stored) in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {w} | {sc} | {wall:.2f} | {raw / 1e6 / wall:.0f} | {cpu / (raw / 1e9):.2f} | "
              f"{raw / stored:.2f} |")


if __name__ == "__main__":
    main()
