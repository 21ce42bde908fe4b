"""`coala-stream capture`: run a model over calibration text and store every distinct linear-layer input."""

from __future__ import annotations

import sys

from ._common import add_parser, command_threads
from .options import add_options, config_from_args

DESCRIPTION = """\
Run a model over calibration text and store every distinct linear-layer input.

Every nn.Linear except the output embeddings is hooked; layers that read the
same tensor (q/k/v, gate/up) share one stored array. Activations are kept bit
for bit in the model's dtype, compressed, chunk by chunk, so memory stays at
the model plus a few chunks. A killed capture resumes from its last commit when
the same command is run again; a finished one is not redone.

--sequential --propagate --ratio F compresses while capturing: block k's inputs
are captured from the already compressed blocks 0..k-1 (block-level: inside
block k, o_proj's and down_proj's inputs come from block k uncompressed), then
reduced, solved and block k replaced by A @ B before its outputs go on to block
k+1. The store ends reduced: run `coala-stream solve STORE` with the same
--ratio/--rank, --method and --mu to write the model the propagation built.
"""

EPILOG = """\
examples:
  coala-stream capture --out calib.zarr                         # embedded SmolLM2, builtin text
  coala-stream capture ./my-llama --out calib.zarr --data wiki.train.raw --samples 256 --seq-len 2048
  coala-stream capture ./models --gguf-file m.Q8_0.gguf --out calib.h5 --backend hdf5
  coala-stream capture --out c.zarr --layers 'layers\\.(0|1)\\.' --samples 8    # first two blocks
  coala-stream capture ./big-llama --out calib.zarr --sequential --hidden-dir /scratch/h  # one block at a time
  coala-stream capture ./my-llama --out prop.zarr --sequential --propagate --ratio 0.2   # then:
  coala-stream solve prop.zarr --ratio 0.2 --out my-llama-80
"""


def register(subparsers) -> None:
    from ..sequential import SequentialConfig

    p = add_parser(subparsers, "capture",
                   "run a model over calibration text and store every distinct linear-layer input",
                   DESCRIPTION, EPILOG)
    add_options(p, SequentialConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..sequential import SequentialConfig, run as run_capture

    config = config_from_args(SequentialConfig, args)
    with command_threads(config.threads) as threads:
        s = run_capture(config, progress=True)
    if s["status"] == "already complete":
        print(f"{s['store']}: already complete ({s['samples']} samples x {s['seq_len']} tokens); "
              f"nothing to do")
    else:
        print(f"{s['store']}: {s['inputs']} inputs, {s['samples']} samples x {s['seq_len']} tokens "
              f"({s['dtype']}, {s['backend']}{_how(s)}) in {s['seconds']:.1f} s"
              + (f"; {s['stored_bytes'] / 1e6:.1f} MB on disk" if "stored_bytes" in s else ""))
        print(f"{threads}; the forward ran on {s['threads']} beside {s['writers']} writer "
              f"thread{'' if s['writers'] == 1 else 's'}")
    print(f"next: coala-stream reduce {s['store']}" if not s.get("propagate") else
          f"next: coala-stream solve {s['store']} --out DIR with the same compression settings")
    sys.stdout.flush()
    return 0


def _how(s: dict) -> str:
    resumed = f", resumed after {s['samples_before']}" if s["samples_before"] else ""
    if s.get("sequential"):
        resumed = (f", block by block: {s['blocks']} blocks"
                   + (f", resumed at block {s['block_before']}" if s["block_before"] else ""))
    if s.get("propagate"):
        pr = s["propagate"]
        size = f"ratio {pr['ratio']}" if pr["ratio"] is not None else f"rank {pr['rank']}"
        resumed += (f", propagated through {pr.get('compressed_layers', 0)} layers compressed "
                    f"with {pr['method']} {size}" + (f" mu {pr['mu']}" if pr["mu"] else "")
                    + f"; reduced (reduce {pr.get('reduce_seconds', 0):.1f} s, solve "
                      f"{pr.get('solve_seconds', 0):.1f} s)")
    return resumed
