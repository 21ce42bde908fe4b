"""--bos: windows start with the BOS token where the model's tokenizer adds one by default.

Two tiny tokenizers: conftest's (has a BOS token ``<s>`` but adds none, like SmolLM2's and
Qwen2.5's) and a copy whose post-processor puts ``<s>`` in front of every text (like
Gemma's or Llama 3's). Layout checked: ``[BOS] + seq_len - 1`` text tokens per window, in
capture (plain and --sequential) and in eval, where every text token is predicted.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coala_stream import calib, evaluate
from coala_stream.capture import CaptureConfig, run_capture
from coala_stream.cli import main
from coala_stream.compress import CompressConfig
from coala_stream.errors import StoreError, UsageError
from coala_stream.merge import merge_shards
from coala_stream.reduce import ReduceConfig, run_reduce
from coala_stream.sequential import SequentialConfig, run_sequential
from coala_stream.store import open_store

from .test_capture import hooked_inputs
from .test_merge import text_file  # noqa: F401  (the same 40k characters of builtin text)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(samples=4, seq_len=32, chunk_tokens=64)
SEQ = 32


@pytest.fixture(scope="module")
def bos_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """conftest's tiny Llama with a tokenizer that starts every text with <s>."""
    from tokenizers import processors

    out = tmp_path_factory.mktemp("bos-model") / "m"
    shutil.copytree(tiny_model_dir(), out)
    tok = AutoTokenizer.from_pretrained(out)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save_pretrained(out)
    return out


def _tok(path):
    return AutoTokenizer.from_pretrained(path)


def test_auto_follows_the_tokenizer_and_always_needs_a_bos_token(tiny_model_dir, bos_model_dir):
    plain, adding = _tok(tiny_model_dir()), _tok(bos_model_dir)
    assert not calib.adds_bos(plain) and calib.adds_bos(adding)
    bos = adding.bos_token_id
    assert adding("abc")["input_ids"][0] == bos
    assert calib.bos_token(plain, "auto") is None and calib.bos_token(adding, "auto") == bos
    assert calib.bos_token(plain, "always") == plain.bos_token_id  # has one, adds none
    assert calib.bos_token(adding, "never") is None
    none = AutoTokenizer.from_pretrained(tiny_model_dir(), bos_token=None)
    assert calib.bos_token(none, "auto") is None
    with pytest.raises(UsageError, match="no BOS token; use --bos auto or --bos never"):
        calib.bos_token(none, "always")
    with pytest.raises(UsageError, match="--bos must be one of auto, always, never"):
        calib.bos_token(plain, "yes")


def test_calibration_window_is_bos_plus_seq_len_minus_one_text_tokens(bos_model_dir, text_file):
    tok = _tok(bos_model_dir)
    bos = calib.bos_token(tok, "auto")
    cal = calib.calibration_windows(tok, str(text_file), 4, SEQ, seed=3, bos=bos)
    plain = calib.calibration_windows(tok, str(text_file), 4, SEQ, seed=3)
    ids = torch.tensor(tok(text_file.read_text(), add_special_tokens=False)["input_ids"])
    assert cal.ids.shape == plain.ids.shape == (4, SEQ)
    assert (cal.ids[:, 0] == bos).all()
    for row, start in zip(cal.ids, cal.starts):
        assert torch.equal(row[1:], ids[start:start + SEQ - 1])
    assert cal.attrs()["bos_token_id"] == bos and plain.attrs()["bos_token_id"] is None
    assert cal.tokens_sha256 != plain.tokens_sha256


def test_capture_records_bos_and_stores_the_bos_position(bos_model_dir, text_file, tmp_path,
                                                           capsys):
    out = tmp_path / "s.zarr"
    run_capture(CaptureConfig(out=str(out), model=str(bos_model_dir), data=str(text_file),
                              **SMALL), progress=False)
    tok = _tok(bos_model_dir)
    with open_store(out) as s:
        cal_attrs = s.attrs["calibration"]
        got = torch.cat(list(s.iter_chunks("model.layers.0.self_attn.q_proj")))
    assert cal_attrs["bos"] == "auto" and cal_attrs["bos_token_id"] == tok.bos_token_id
    cal = calib.calibration_windows(tok, str(text_file), SMALL["samples"], SEQ,
                                    bos=tok.bos_token_id)
    want = hooked_inputs(bos_model_dir, "float32", cal.ids, 2)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(got, want)  # row 0 of each sample is the BOS position's input
    assert main(["status", str(out)]) == 0
    assert "4 x 32 tokens, seed 0, each window [BOS] + text" in capsys.readouterr().out

    # a resume (or rerun) whose --bos resolves otherwise is refused, naming --bos
    refused = r"--bos \(the token .*store has 0, this run asks for None"
    with pytest.raises(StoreError, match=refused):
        run_capture(CaptureConfig(out=str(out), model=str(bos_model_dir), data=str(text_file),
                                  bos="never", **SMALL), progress=False)
    again = run_capture(CaptureConfig(out=str(out), model=str(bos_model_dir),
                                      data=str(text_file), bos="always", **SMALL), progress=False)
    assert again["status"] == "already complete"  # always = auto here: the same windows


def test_plain_tokenizer_records_no_bos_and_cli_refuses_always_on_resume(
        tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "p.zarr"
    base = ["capture", str(tiny_model_dir()), "--data", str(text_file), "--out", str(out),
            "--samples", "4", "--seq-len", "32", "--threads", "1"]
    assert main(base) == 0
    with open_store(out) as s:
        cal = s.attrs["calibration"]
    assert (cal["bos"], cal["bos_token_id"]) == ("auto", None)
    capsys.readouterr()
    assert main([*base, "--bos", "always"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[0]  # then "(run with --debug ...)"
    assert "other settings" in err and "--bos (the token" in err
    with pytest.raises(SystemExit) as exc:  # argparse's choices
        main([*base, "--bos", "sometimes"])
    assert exc.value.code == 2


def test_sequential_capture_equals_plain_capture_with_bos(bos_model_dir, text_file, tmp_path):
    kw = dict(model=str(bos_model_dir), data=str(text_file), **SMALL)
    run_capture(CaptureConfig(out=str(tmp_path / "a.zarr"), **kw), progress=False)
    run_sequential(SequentialConfig(out=str(tmp_path / "b.zarr"), sequential=True, **kw),
                   progress=False)
    with open_store(tmp_path / "a.zarr") as a, open_store(tmp_path / "b.zarr") as b:
        assert a.attrs["calibration"] == b.attrs["calibration"]
        for name in a.inputs:
            assert torch.equal(torch.cat(list(a.iter_chunks(name))),
                               torch.cat(list(b.iter_chunks(name)))), name


def test_compress_passes_bos_to_both_captures(tmp_path):
    c = CompressConfig(out=str(tmp_path / "o"), bos="never")
    assert c.capture(tmp_path / "a.zarr", False).bos == "never"
    assert c.capture(tmp_path / "b.zarr", True).bos == "never"


def test_merge_refuses_shards_with_another_bos(bos_model_dir, text_file, tmp_path):
    parts = []
    for i, bos in enumerate(("auto", "never")):
        out = tmp_path / f"p{i}.zarr"
        run_capture(CaptureConfig(out=str(out), model=str(bos_model_dir), data=str(text_file),
                                  shard=f"{i}/2", bos=bos, **SMALL), progress=False)
        run_reduce(out, ReduceConfig(dtype="float32"), progress=False)
        parts.append(out)
    with pytest.raises(StoreError, match=r"differs from .* in --bos"):
        merge_shards(tmp_path / "m.zarr", parts)


def _reference_bos_ppl(model, ids, bos, seq, windows):
    """transformers' own loss on [bos] + text, the BOS position not predicted (label -100)."""
    losses = []
    with torch.no_grad():
        for i in range(windows):
            text = ids[i * (seq - 1):(i + 1) * (seq - 1)]
            w = torch.cat([torch.tensor([bos]), text]).unsqueeze(0)
            labels = w.clone()
            labels[0, 0] = -100  # never a target anyway: labels shift left by one
            losses.append(float(model(input_ids=w, labels=labels).loss))
    return math.exp(sum(losses) / len(losses))


def test_eval_windows_with_bos_and_unchanged_without(tiny_model_dir, bos_model_dir, text_file):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir()).eval()
    text = text_file.read_text()
    plain = _tok(tiny_model_dir())
    never = evaluate.perplexity(model, plain, text, SEQ, 5, bos="never")
    assert evaluate.perplexity(model, plain, text, SEQ, 5, bos="auto") == never
    adding = _tok(bos_model_dir)  # same vocabulary, same text tokens
    auto = evaluate.perplexity(model, adding, text, SEQ, 5, bos="auto")
    assert auto["bos_token_id"] == adding.bos_token_id and never["bos_token_id"] is None
    assert auto["predicted_tokens"] == never["predicted_tokens"] == 5 * (SEQ - 1)
    ids = evaluate.token_ids(adding, text)
    want = _reference_bos_ppl(model, ids, adding.bos_token_id, SEQ, 5)
    assert auto["ppl"] == pytest.approx(want, rel=1e-5)
    assert auto["ppl"] != pytest.approx(never["ppl"], rel=1e-3)


def test_eval_cli_bos_option(bos_model_dir, text_file, capsys):
    base = ["eval", str(bos_model_dir), "--data", str(text_file), "--seq-len", str(SEQ),
            "--max-windows", "2", "--quiet", "--threads", "1"]
    assert main(base) == 0
    assert f"2 windows x {SEQ} tokens (BOS + text)" in capsys.readouterr().out
    assert main([*base, "--bos", "never"]) == 0
    assert "(BOS + text)" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main([*base, "--bos", "maybe"])
    assert exc.value.code == 2


def test_tasks_take_bos_as_lm_eval_encodes(tiny_model_dir, bos_model_dir):
    """eval --tasks hands --bos to lm-eval's add_bos_token: auto is the tokenizer's own
    convention (None), never is False, always is True where the tokenizer adds a BOS itself and
    refused where it cannot (lm-eval encodes every context with the tokenizer)."""
    from coala_stream.tasks.run import add_bos

    plain, adding = _tok(tiny_model_dir()), _tok(bos_model_dir)
    assert add_bos(plain, "auto") is None and add_bos(adding, "auto") is None
    assert add_bos(plain, "never") is False and add_bos(adding, "never") is False
    assert add_bos(adding, "always") is True
    with pytest.raises(UsageError, match="--bos always with --tasks"):
        add_bos(plain, "always")


def test_loss_allocation_draws_a_bos_store_s_windows_again(bos_model_dir, text_file, tmp_path):
    """solve --allocate loss draws the store's windows again and checks them against its
    tokens hash: with the BOS the store was captured with, else the hash never matches."""
    from coala_stream.models import ModelSpec, load_config
    from coala_stream.solve import gradients

    out = tmp_path / "s.zarr"
    run_capture(CaptureConfig(out=str(out), model=str(bos_model_dir), data=str(text_file),
                              **SMALL), progress=False)
    spec = ModelSpec.from_args(str(bos_model_dir), None)
    with open_store(out) as s:
        ids = gradients.calibration_ids(s, spec, load_config(spec))
    assert ids.shape == (SMALL["samples"], SMALL["seq_len"])
    assert bool((ids[:, 0] == _tok(bos_model_dir).bos_token_id).all())
