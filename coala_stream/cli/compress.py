"""`coala-stream compress`: capture, reduce, solve (and refine) in one resumable command."""

from __future__ import annotations

import json
import sys

from ._common import add_parser, command_threads, threads_line
from .options import add_options, config_from_args

DESCRIPTION = """\
Compress a model in one command: capture, reduce, solve (and refinement), resumable.

For people who just want a compressed model; the three stage commands (capture,
reduce, solve) stay for long jobs and clusters. Each linear of the decoder blocks
is compressed group by group (q/k/v, o, gate/up, down) while the calibration
passes through the model: a group's inputs come from the model with everything
before it already compressed, and with --objective output its factors are fitted
to the ORIGINAL model's outputs (target T = alpha X + (1 - alpha) Xh), all without
a Gram matrix. Killed or preempted (exit 75 after SIGTERM): rerun the same command.

Default recipe: {recipe}.
Why: --allocate loss (ranks from the calibration loss: every singular component
scored by its first-order effect on it, ZS-SVD's zero-sum rule) measured best at
--ratio 0.2 on both models tried, calibrated on WikiText-2 (docs/benchmarks.md):
SmolLM2-135M 42.66 against 63.08 with uniform ranks and 99.84 for SVD-LLM (30 x 512
windows; 38.89, 52.50 and 77.29 on 2048-token ones), Qwen2.5-Coder-0.5B 46.75
against 61.06 with uniform ranks (original 40.67). Where more is removed the
first-order scores mislead: on held-out text (the calibration text the draw left
out, never the evaluated windows) loss-aware ranks tie with uniform ones at 0.4
(82.28 against 81.72 on SmolLM2) and lose at 0.6 (202.34 against 160.02), so from
--ratio 0.4 on the default is uniform ranks, which also cost about 1.6x less CPU
(--allocate loss adds an ordinary capture and one gradient pass).
The output objective with alpha 0.5 and the refinement
measured best before (59.07 against 67.70 without refinement and 62.27 / 64.41
with alpha 0.4 / 0.6; --allocate global 82.34).
Llama-style models (Llama, Mistral, Qwen2, Phi-3, SmolLM) only: it runs block by block.
"""

EPILOG = """\
examples:
  coala-stream compress --out smol-80                        # embedded SmolLM2, builtin text
  coala-stream compress ./my-llama --data wiki.train.raw --samples 64 --ratio 0.2 --out my-80
  coala-stream compress ./my-llama --data chats.jsonl --chat-template --ratio 0.3 --format dense --out my-70
"""


def register(subparsers) -> None:
    from ..compress import CompressConfig, recipe

    p = add_parser(subparsers, "compress",
                   "capture, reduce and solve in one resumable command (the best measured recipe)",
                   DESCRIPTION.format(recipe=recipe()), EPILOG)
    add_options(p, CompressConfig)
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..compress import CompressConfig, run_compress
    from ..solve import format_table

    config = config_from_args(CompressConfig, args)
    with command_threads(config.threads) as threads:
        summary = run_compress(config, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary["report"]))
        print(f"wrote {summary['out']} ({config.format}) in {summary['seconds']:.1f} s; "
              f"{threads_line(threads, summary['threads'])}")
        print(f"next: coala-stream eval {summary['out']}")
    sys.stdout.flush()
    return 0
