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
Why: it measured best on SmolLM2-135M at --ratio 0.2, calibrated on WikiText-2
(docs/benchmarks.md, "The output objective ..."): WikiText-2 perplexity 59.07
against 95.65 for SVD-LLM and for COALA (uniform ranks, same calibration); 62.27
and 64.41 with --alpha 0.4 and 0.6 (same refinement), 67.70 without the refinement,
82.34 with global ranks, 139.16 for COALA with global ranks;
on the same weights in Phi-3's fused layout 59.14 against 92.96 for SVD-LLM.
--allocate loss (ranks from the calibration loss, ZS-SVD's zero-sum rule) scored
42.66 against 63.08 for these defaults and 99.84 for SVD-LLM in a later draw of the
same protocol (ratio 0.2, docs/benchmarks.md, "The field's protocol on SmolLM2 ...");
at ratio 0.4 it is level with them on 2048-token windows (89.76 against 90.23; 97.81
against 105.29 on 512), at 1.6x the CPU time. It is not the default: measured on one
model (SmolLM2) only, and its lead shrinks as the ratio grows. Its gradient pass
runs one block at a time on Llama-style models (2.1 GB peak for SmolLM2's solve,
6.3 GB whole-model).
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
