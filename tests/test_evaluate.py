"""Perplexity protocol (non-overlapping windows, mean NLL over predicted tokens) and `coala-stream eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coala_stream import evaluate
from coala_stream.calib import builtin_text
from coala_stream.cli import main
from coala_stream.errors import CoalaError

from .test_export import activation_factors, linear_names, write

SEQ = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(builtin_text()[100_000:108_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path = tiny_model_dir()
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference_ppl(model, ids: torch.Tensor, seq: int, windows: int) -> float:
    """Per-window mean loss from transformers' own labels path, averaged (equal windows)."""
    losses = []
    with torch.no_grad():
        for i in range(windows):
            w = ids[i * seq:(i + 1) * seq].unsqueeze(0)
            losses.append(float(model(input_ids=w, labels=w).loss))
    return math.exp(sum(losses) / len(losses))


def test_perplexity_matches_transformers_loss_per_window(tiny, text_file):
    _, model, tok = tiny
    text = text_file.read_text()
    res = evaluate.perplexity(model, tok, text, seq_len=SEQ, max_windows=5)
    ids = evaluate.token_ids(tok, text)
    assert res["windows"] == 5 and res["predicted_tokens"] == 5 * (SEQ - 1)
    assert res["text_tokens"] == ids.numel()
    assert res["ppl"] == pytest.approx(reference_ppl(model, ids, SEQ, 5), rel=1e-5)
    batched = evaluate.perplexity(model, tok, text, seq_len=SEQ, max_windows=5, batch_size=3)
    assert batched["ppl"] == pytest.approx(res["ppl"], rel=1e-5)


def test_all_windows_by_default_and_partial_window_dropped(tiny, text_file):
    _, model, tok = tiny
    text = text_file.read_text()
    n = evaluate.token_ids(tok, text).numel()
    res = evaluate.perplexity(model, tok, text, seq_len=SEQ * 8)
    assert res["windows"] == n // (SEQ * 8)


def test_uniform_predictions_give_the_vocabulary_size(tiny_model_dir, text_file):
    path = tiny_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.nn.init.zeros_(model.lm_head.weight)  # untied here: every logit is 0
    tok = AutoTokenizer.from_pretrained(path)
    res = evaluate.perplexity(model, tok, text_file.read_text(), seq_len=SEQ, max_windows=2)
    assert res["ppl"] == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_crlf_text_scores_like_lf(tiny, tmp_path, text_file):
    _, model, tok = tiny
    text = text_file.read_text()
    a = evaluate.perplexity(model, tok, text, seq_len=SEQ, max_windows=3)
    b = evaluate.perplexity(model, tok, text.replace("\n", "\r\n"), seq_len=SEQ, max_windows=3)
    assert a == b


def test_text_shorter_than_a_window_is_an_error(tiny):
    _, model, tok = tiny
    with pytest.raises(CoalaError, match="fewer than one window"):
        evaluate.perplexity(model, tok, "short", seq_len=SEQ)


def test_cli_prints_one_line_and_json(tiny, text_file, capsys):
    path, model, tok = tiny
    rc = main(["eval", str(path), "--data", str(text_file), "--seq-len", str(SEQ),
               "--max-windows", "4", "--quiet"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ppl ") and f"on 4 windows x {SEQ} tokens of sample.txt" in line
    rc = main(["eval", str(path), "--data", str(text_file), "--seq-len", str(SEQ),
               "--max-windows", "4", "--quiet", "--json"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert rc == 0 and captured.err.strip().splitlines()[-1].startswith("ppl ")
    ids = evaluate.token_ids(tok, text_file.read_text())
    assert result["ppl"] == pytest.approx(reference_ppl(model, ids, SEQ, 4), rel=1e-5)
    assert result["windows"] == 4 and result["model_format"] == "hf"


def test_cli_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--quiet"]) == 1
    assert "model not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--max-windows", "0", "--quiet"]) == 2


def test_solve_outputs_are_detected_and_scored(tiny, text_file, tmp_path):
    path, model, _ = tiny
    names = linear_names(model)
    Rs = activation_factors(model, names, batches=2)
    ranks = {n: 8 for n in names}
    for fmt in ("factorized", "dense", "peft"):
        write(fmt, path, tmp_path / fmt, ranks, Rs)
    kw = dict(data=str(text_file), seq_len=SEQ, max_windows=3)
    got = {fmt: evaluate.evaluate(model=str(tmp_path / fmt), progress=False, **kw)
           for fmt in ("factorized", "dense", "peft")}
    original = evaluate.evaluate(model=str(path), progress=False, **kw)
    assert {fmt: r.model_format for fmt, r in got.items()} == {
        "factorized": "factorized", "dense": "dense", "peft": "peft"}
    assert got["factorized"].ppl == pytest.approx(got["dense"].ppl, rel=1e-4)
    assert got["peft"].ppl == pytest.approx(original.ppl, rel=1e-4)  # base + adapter = original
    assert got["dense"].ppl != pytest.approx(original.ppl, rel=1e-4)


def test_nll_in_blocks_equals_one_log_softmax_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 37, 50, generator=g)).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 37), generator=g)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].double().reshape(-1, 50),
                                             ids[:, 1:].reshape(-1), reduction="sum")
    for block in (1, 5, 36, 512):
        assert evaluate.nll_sum(logits, ids, block) == pytest.approx(float(want), rel=1e-6)
