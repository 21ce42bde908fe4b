"""`coala-stream merge`: one store for solve from the reduced stores of a `capture --shard` array."""

from __future__ import annotations

import json
import sys

from ._common import add_parser
from .options import add_options, config_from_args

DESCRIPTION = """\
Merge the reduced stores of a `capture --shard I/N` job array into one store.

Each of N nodes captures part I of the same calibration draw (`capture --shard
I/N`, every other option the same) into its own store and reduces it there
(`coala-stream reduce`, locally or on Dask). merge combines the parts' R
factors by TSQR (R of all the parts' rows, to float32 rounding the R of one
capture of every sample) and sums their statistics into a new Zarr store that
`coala-stream solve` takes like any other. No activations are copied: the
merged store holds only the merged R's, so `reduce` has nothing to fold in it
and `status` says it was merged and from where.

Shards that do not belong together are refused, naming the shard: another
model, tokenizer, calibration, seed, --samples, --seq-len, dtype, --layers or
chunk size, other inputs, unreduced inputs or other reduce settings, a part
given twice or missing. The new store appears only when it is complete.
"""

EPILOG = """\
examples:
  coala-stream capture ./my-llama --out part0.zarr --data train.jsonl --shard 0/2   # node 0
  coala-stream capture ./my-llama --out part1.zarr --data train.jsonl --shard 1/2   # node 1
  coala-stream reduce part0.zarr; coala-stream reduce part1.zarr                 # each where it lies
  coala-stream merge --out calib.zarr part0.zarr part1.zarr
  coala-stream solve calib.zarr --ratio 0.2 --out my-llama-80
"""


def register(subparsers) -> None:
    from ..merge import MergeConfig

    p = add_parser(subparsers, "merge",
                   "merge the reduced stores of a `capture --shard I/N` array into one store",
                   DESCRIPTION, EPILOG)
    p.add_argument("shards", nargs="+", metavar="SHARD",
                   help="the reduced store of every part, in any order")
    add_options(p, MergeConfig)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..merge import MergeConfig, merge_shards

    config = config_from_args(MergeConfig, args)
    s = merge_shards(config.out, args.shards, overwrite=config.overwrite)
    if args.json:
        print(json.dumps(s))
        return 0
    tokens = sum(s["tokens"].values()) // max(1, s["inputs"])
    print(f"{s['store']}: {s['inputs']} inputs merged from {s['shards']} shards ({s['samples']} "
          f"samples, {tokens} tokens per input; no activations copied) in {s['seconds']:.1f} s")
    print(f"next: coala-stream solve {s['store']} --ratio F --out DIR")
    sys.stdout.flush()
    return 0
