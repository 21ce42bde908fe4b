"""Capture vs the plain forward passes over the same tokens (issue 8's capture target).

For the same model, dtype, calibration windows and batch size, times

- load: loading the model (what capture also pays before its first batch);
- forward: the plain forward passes over every window, no hooks, no writes;
- capture: ``run_capture`` end to end into a fresh store (load, probe, forward
  with hooks, compression and writes on the writer thread, commits);

interleaved ``--repeats`` times (the minimum of each is reported, the machine
being shared), and prints ``(capture - load) / forward`` (target <= 1.3),
MB/s of raw activations written, and the store's compression ratio.

    .venv/bin/python tools/bench_capture.py                     # embedded SmolLM2, builtin text
    .venv/bin/python tools/bench_capture.py --dtype bfloat16 --samples 32
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from coala_stream import calib, models
from coala_stream.capture import CaptureConfig, run_capture


def forward_seconds(spec, dtype: str, ids: torch.Tensor, batch: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    model = models.load_model(spec, dtype, "cpu", progress=False)
    t1 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            model(input_ids=ids[i:i + batch], use_cache=False)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded SmolLM2)")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backend", default="zarr", choices=["zarr", "hdf5"])
    ap.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the plain forward's)")
    ap.add_argument("--capture-threads", type=int, default=None,
                    help="capture --threads (default: capture's own, the cores minus --writers)")
    ap.add_argument("--writers", type=int, default=None, help="capture --writers (default: capture's)")
    ap.add_argument("--shard-chunks", type=int, default=None,
                    help="chunks per zarr shard file (default: the store's default); 1 writes every "
                         "chunk in one piece, more rewrite a growing shard once per chunk")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    spec = models.ModelSpec.from_args(args.model)
    cfg = CaptureConfig(out="unused", model=spec, data=args.data, samples=args.samples,
                        seq_len=args.seq_len, dtype=args.dtype, device="cpu", backend=args.backend,
                        shard_chunks=args.shard_chunks, threads=args.capture_threads,
                        writers=args.writers)
    batch = cfg.resolved_batch_size()
    ids = calib.calibration_windows(models.load_tokenizer(spec), args.data, args.samples,
                                    args.seq_len, 0).ids
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench-capture-"))
    loads, forwards, captures, summary = [], [], [], None
    try:
        for rep in range(args.repeats):
            load, fwd = forward_seconds(spec, args.dtype, ids, batch)
            loads.append(load)
            forwards.append(fwd)
            out = work / f"store-{rep}.{'h5' if args.backend == 'hdf5' else 'zarr'}"
            cfg.out = str(out)
            t0 = time.perf_counter()
            summary = run_capture(cfg, progress=False)
            captures.append(time.perf_counter() - t0)
            print(f"repeat {rep}: load {load:.1f} s, forward {fwd:.1f} s, capture {captures[-1]:.1f} s",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    load, fwd, cap = min(loads), min(forwards), min(captures)
    raw_mb = summary["store_raw_bytes"] / 1e6
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"model {spec.describe()}, {args.dtype}, {args.samples} x {args.seq_len} tokens of "
          f"{args.data}, batch {batch}, backend {args.backend} (shard_chunks {args.shard_chunks or 'default'}), {summary['inputs']} inputs, "
          f"capture threads {args.capture_threads or 'default'}, writers {summary['writers']}; "
          f"minimum of {args.repeats}\n")
    print("| load s | forward s | capture s | (capture - load) / forward | raw MB | stored MB | "
          "ratio | MB/s raw written |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {load:.1f} | {fwd:.1f} | {cap:.1f} | {(cap - load) / fwd:.2f}x | {raw_mb:.0f} | "
          f"{summary['stored_bytes'] / 1e6:.0f} | {summary['store_raw_bytes'] / summary['stored_bytes']:.2f} | "
          f"{raw_mb / (cap - load):.0f} |")


if __name__ == "__main__":
    main()
