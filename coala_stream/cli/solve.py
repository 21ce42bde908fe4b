"""`coala-stream solve`: compute low-rank factors per layer and write a compressed model or LoRA adapters."""

from __future__ import annotations

import json
import sys

from ._common import add_parser, command_threads
from .options import add_options, config_from_args

DESCRIPTION = """\
Compute low-rank factors per layer and write a compressed model or LoRA adapters.

For every linear layer the store has an input for (the decoder blocks' linears;
--layers narrows it), W is read from the source model and R from the store's
reduce results; COALA takes the SVD of W R^T (no Gram matrix, no inverse).
The baselines (svd, svdllm, asvd) run through the same pipeline on the same
store. The output is written beside OUT under a temporary name and renamed
when complete; a per-layer report goes to stdout and OUT/solve_report.json.

Formats: factorized (two small linears per layer; smaller files; load with
coala_stream.load_model), dense (W' = A B in an ordinary Hugging Face
checkpoint), peft (OUT/base: residual W - A B; OUT/adapter: a LoRA adapter
holding A, B, which together reproduce the original model before training).
"""

EPILOG = """\
examples:
  coala-stream solve calib.zarr --ratio 0.2 --out smol-80
  coala-stream solve calib.zarr --ratio 0.4 --allocate global --mu 0.01 --out smol-60
  coala-stream solve calib.zarr --ratio 0.2 --allocate loss --out smol-80-loss
  coala-stream solve calib.zarr --ratio 0.2 --method svdllm --format dense --out smol-svdllm
  coala-stream solve calib.zarr --rank 16 --format peft --out smol-lora
  coala-stream solve calib.zarr --ratio 0.3 --layers 'mlp\\.' --out smol-mlp
"""


def register(subparsers) -> None:
    from ..solve import SolveConfig

    p = add_parser(subparsers, "solve",
                   "compute low-rank factors per layer and write a compressed model or LoRA adapters",
                   DESCRIPTION, EPILOG)
    p.add_argument("store", metavar="STORE", help="a reduced activation store (Zarr directory or HDF5 file)")
    add_options(p, SolveConfig)
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..solve import SolveConfig, format_table, run_solve

    config = config_from_args(SolveConfig, args)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with command_threads(config.threads) as threads:
        report = run_solve(args.store, config, progress=not args.quiet)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        print(f"wrote {report['out']} ({config.format}, {config.method}; {_files(report['out'])}) "
              f"in {report['seconds']:.1f} s")
        print(threads)
        print(f"next: coala-stream eval {report['out']}" + _load_hint(config.format, report['out']))
    sys.stdout.flush()
    return 0


def _files(out: str) -> str:
    from pathlib import Path

    files = [p for p in Path(out).rglob("*") if p.is_file()]
    return f"{len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB"


def _load_hint(fmt: str, out: str) -> str:
    """How the output loads outside coala-stream: the first thing a user tries next."""
    return {
        "factorized": f"; from Python: AutoModelForCausalLM.from_pretrained({out!r}, "
                      f"trust_remote_code=True) or coala_stream.load_model({out!r})",
        "dense": f"; from Python: AutoModelForCausalLM.from_pretrained({out!r})",
        "peft": f"; from Python: PeftModel.from_pretrained(base, {out + '/adapter'!r}) with base "
                f"= AutoModelForCausalLM.from_pretrained({out + '/base'!r})",
    }.get(fmt, "")
