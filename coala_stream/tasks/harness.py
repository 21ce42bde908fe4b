"""lm-eval-harness runs the tasks: its own task configs, prompts, metrics and aggregation.

What changes is only where the documents come from: each task is lm-eval's registered
config with ``custom_dataset`` (a callable returning the local rows, `data.load_split`),
``test_split`` and ``training_split`` unset, so lm-eval scores the validation split (it
scores on test when a config has one, and zero-shot needs no training split). The
overrides are given the way lm-eval's group configs give them to member tasks, so the
rest of each config (doc_to_text, doc_to_choice, metric_list, ...) is lm-eval's file.
The model goes in as lm-eval's ``HFLM`` around the already loaded model and tokenizer.
"""

from __future__ import annotations

import io
import logging
import re
from contextlib import contextmanager, nullcontext, redirect_stderr
from functools import partial
from pathlib import Path

from ..errors import CoalaError
from . import data

PIP_EVAL = "pip install 'coala-stream[eval]' (or pip install 'lm-eval>=0.4.13,<0.5')"
MIN_LM_EVAL = (0, 4, 13)

# lm-eval's folder of each task's YAML, relative to lm_eval/tasks: indexing only these
# takes a fraction of a second instead of scanning lm-eval's thousands of configs
TASK_DIRS = {
    "arc_easy": "arc", "arc_challenge": "arc", "boolq": "super_glue/boolq",
    "hellaswag": "hellaswag", "openbookqa": "openbookqa", "piqa": "piqa",
    "winogrande": "winogrande",
}
GROUP = "coala_stream_offline"


def require_lm_eval() -> str:
    """lm-eval's version; a one-line CoalaError naming the install command when it is absent
    or outside the versions this code was written against (0.4.9 does not even import under
    transformers 5; the task-manager calls here are 0.4.13's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("lm_eval")
    except PackageNotFoundError:
        raise CoalaError(f"zero-shot accuracy (--tasks) needs lm-eval: {PIP_EVAL}") from None
    numbers = tuple(int(p) for p in re.findall(r"\d+", found)[:3])
    if not MIN_LM_EVAL <= numbers < (0, 5):
        raise CoalaError(f"lm-eval {found} is installed; --tasks needs lm-eval>=0.4.13,<0.5: "
                         f"{PIP_EVAL}")
    return found


def _rows(path: Path, task: str, **_metadata):
    import datasets

    # lm-eval calls custom_dataset with the task's metadata as keywords: nothing here uses them
    return datasets.DatasetDict({data.SPLIT: data.load_split(path, task)})


def group_spec(paths: dict[str, Path]) -> dict:
    """An inline lm-eval group whose members are the registered tasks with local data."""
    members = [{"task": task, "custom_dataset": partial(_rows, path, task),
                "test_split": None, "training_split": None, "validation_split": data.SPLIT}
               for task, path in paths.items()]
    return {"group": GROUP, "task": members}


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager over the folders of ``tasks`` only (all of lm-eval's when
    this version keeps one of them elsewhere)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    base = Path(lm_eval.tasks.__file__).parent
    dirs = sorted({str(base / TASK_DIRS[t]) for t in tasks if (base / TASK_DIRS[t]).is_dir()})
    manager = TaskManager(include_defaults=False, include_path=dirs) if dirs else None
    if manager is None or any(t not in manager.all_subtasks for t in tasks):
        manager = TaskManager()
    return manager


@contextmanager
def quiet_lm_eval():
    """lm-eval logs a notice per task about custom datasets and one about the model
    instance; keep its warnings and errors, drop the rest, and put the level back."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run(model, tokenizer, paths: dict[str, Path], limit: int | None, batch_size: int,
        progress: bool = True, add_bos_token: bool | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``model`` on the tasks of ``paths``, zero-shot:
    its whole result dict (``results``, ``n-samples``, ``configs``, ...). Without
    ``progress`` lm-eval's bars are dropped (they are tqdm's on stderr, with no switch;
    its log records keep their own stream)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    bars = nullcontext() if progress else redirect_stderr(io.StringIO())
    with quiet_lm_eval(), bars:
        # float32 log-softmax as our perplexity does: a bfloat16 model's log-likelihoods
        # would otherwise be summed in bfloat16
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  softmax_dtype=torch.float32, add_bos_token=add_bos_token)
        with caller_rng():
            return simple_evaluate(model=lm, tasks=[group_spec(paths)],
                                   task_manager=task_manager(list(paths)), num_fewshot=0,
                                   limit=limit, log_samples=False)


@contextmanager
def caller_rng():
    """The process's random generators (Python's, numpy's, torch's CPU one) as they were:
    ``simple_evaluate`` seeds all three for its own reproducibility, which would silently
    reseed a program that calls `evaluate_tasks` between its own draws."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def metrics(results: dict, tasks: list[str]) -> dict[str, dict]:
    """Per task: lm-eval's acc and acc_norm (where the task defines it), their standard
    errors, and the documents scored / available."""
    out = {}
    for task in tasks:
        row = results["results"][task]
        got = {name: row[f"{name},none"] for name in ("acc", "acc_norm")
               if f"{name},none" in row}
        got.update({f"{name}_stderr": row[f"{name}_stderr,none"] for name in list(got)
                    if f"{name}_stderr,none" in row})
        samples = results.get("n-samples", {}).get(task, {})
        got["documents"] = samples.get("effective", row.get("sample_len"))
        got["documents_available"] = samples.get("original")
        out[task] = got
    return out
