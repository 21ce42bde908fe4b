"""`coala-stream reduce`: fold each stored input into its triangular factor R (streaming TSQR)."""

from __future__ import annotations

import sys

from ._common import add_parser

DESCRIPTION = """\
Fold each stored input into its triangular factor R (streaming TSQR).

Chunks are read in order in background threads, upcast on the device and
folded, several at a time, into R with R^T R = X^T X; neither X nor X^T X is
ever held. Each input's R (plus column sums of |x| for ASVD, and with
--with-gram the float32 Gram matrix for the SVD-LLM baseline) goes to
STORE/reduce/<input>.safetensors, which is also the checkpoint.

A run killed at any moment resumes from its last checkpoint when the same
command is run again, and ends with the same R bit for bit (same machine and
device). SIGINT/SIGTERM save a checkpoint and exit with code 75. Finished
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


def _help(name: str) -> str:
    from ..reduce import config_help

    return config_help(name)


def register(subparsers) -> None:
    p = add_parser(subparsers, "reduce",
                   "fold each stored input into its triangular factor R (streaming TSQR)",
                   DESCRIPTION, EPILOG)
    p.add_argument("store", metavar="STORE", help="a Zarr store directory or an HDF5 store file")
    p.add_argument("--device", default="auto", metavar="auto|cuda|cpu", help=_help("device"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help=_help("dtype"))
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help=_help("checkpoint_every"))
    p.add_argument("--inputs", metavar="REGEX", help=_help("inputs"))
    p.add_argument("--group-rows", type=int, metavar="N", help=_help("group_rows"))
    p.add_argument("--with-gram", action="store_true", help=_help("with_gram"))
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N", help=_help("workers"))
    where.add_argument("--scheduler", metavar="ADDRESS", help=_help("scheduler"))
    p.add_argument("--prefetch", type=int, default=4, metavar="K", help=_help("prefetch"))
    p.add_argument("--read-threads", type=int, default=2, metavar="N", help=_help("read_threads"))
    p.add_argument("--threads", type=int, metavar="N", help=_help("threads"))
    p.add_argument("--restart", action="store_true", help=_help("restart"))
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import Interrupted
    from ..reduce import ReduceConfig, run_reduce

    config = ReduceConfig(
        device=args.device, dtype=args.dtype, checkpoint_every=args.checkpoint_every,
        inputs=args.inputs, group_rows=args.group_rows, with_gram=args.with_gram,
        workers=args.workers, scheduler=args.scheduler, prefetch=args.prefetch,
        read_threads=args.read_threads, threads=args.threads, restart=args.restart)
    try:
        s = run_reduce(args.store, config, progress=True)
    except Interrupted as exc:
        print(f"coala-stream reduce: {exc}", file=sys.stderr)
        return exc.exit_code
    actions = [v["action"] for v in s["inputs"].values()]
    counts = ", ".join(f"{actions.count(a)} {a}" for a in ("folded", "resumed", "extended", "skipped")
                       if a in actions)
    print(f"{s['store']}: {len(actions)} inputs ({counts or 'none'}); {s['bytes_folded'] / 1e9:.3f} GB "
          f"folded in {s['seconds']:.1f} s ({s['gb_per_s']:.3f} GB/s, {s['mode']}, {s['device']}, "
          f"{s['dtype']}) -> {s['reduce_dir']}")
    sys.stdout.flush()
    return 0
