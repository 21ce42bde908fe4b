"""`coala-stream reduce`: fold each stored input into its triangular factor R (streaming TSQR)."""

from __future__ import annotations

import sys

from ._common import add_parser, command_threads, threads_line
from .options import add_options, config_from_args

DESCRIPTION = """\
Fold each stored input into its triangular factor R (streaming TSQR).

Chunks are read in order in background threads, upcast on the device and
folded, several at a time, into R with R^T R = X^T X; neither X nor X^T X is
ever held. Each input's R (plus column sums of |x| for ASVD, and with
--with-gram the float32 Gram matrix for the SVD-LLM baseline) goes to
STORE/reduce/<input>.safetensors, which is also the checkpoint.

A run killed at any moment resumes from its last checkpoint when the same
command is run again, and ends with the same R bit for bit (same machine and
device; a resumed run keeps the thread count the first one used, recorded in
STORE/reduce/run.json, unless --threads is given).
SIGINT/SIGTERM save a checkpoint and exit with code 75. Finished
inputs are skipped. One reduce per store at a time (a lock in STORE/reduce/).

With --workers or --scheduler, chunk ranges fold on Dask workers and merge in
a tree; there the result file is written once per finished input.
"""

EPILOG = """\
examples:
  coala-stream reduce calib.zarr
  coala-stream reduce calib.zarr --device cuda --dtype float64
  coala-stream reduce calib.zarr --inputs 'layers\\.0\\.' --checkpoint-every 300
  coala-stream reduce calib.zarr --workers 4                  # local Dask cluster
  coala-stream reduce calib.zarr --scheduler tcp://head:8786  # existing Dask cluster
  coala-stream reduce calib.zarr --restart                    # discard checkpoints, start over
"""


def register(subparsers) -> None:
    from ..reduce import ReduceConfig

    p = add_parser(subparsers, "reduce",
                   "fold each stored input into its triangular factor R (streaming TSQR)",
                   DESCRIPTION, EPILOG)
    p.add_argument("store", metavar="STORE", help="a Zarr store directory or an HDF5 store file")
    add_options(p, ReduceConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..reduce import ReduceConfig, run_reduce

    config = config_from_args(ReduceConfig, args)
    with command_threads(config.threads) as threads:
        s = run_reduce(args.store, config, progress=True)
    actions = [v["action"] for v in s["inputs"].values()]
    counts = ", ".join(f"{actions.count(a)} {a}" for a in ("folded", "resumed", "extended", "skipped")
                       if a in actions)
    print(f"{s['store']}: {len(actions)} inputs ({counts or 'none'}); {s['bytes_folded'] / 1e9:.3f} GB "
          f"folded in {s['seconds']:.1f} s ({s['gb_per_s']:.3f} GB/s, {s['mode']}, {s['device']}, "
          f"{s['dtype']}) -> {s['reduce_dir']}")
    print(threads_line(threads, s["threads"])
          + ("; the Dask workers use their own" if s["mode"] == "dask" else ""))
    cap = s["capture"]
    if not cap["complete"]:
        print(f"note: the capture of {s['store']} is not complete ({cap['samples_done']} of "
              f"{cap['samples']} samples committed for every input): R covers what was committed; "
              f"finish the capture, then rerun reduce (it extends these results)")
    else:
        if cap.get("merged_shards"):
            print(f"note: {s['store']} was merged from {cap['merged_shards']} shards by "
                  f"coala-stream merge and holds no activations: nothing to fold")
        print(f"next: coala-stream solve {s['store']} --ratio F --out DIR")
    sys.stdout.flush()
    return 0
