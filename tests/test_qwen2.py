"""A tiny random Qwen2 (biases on q/k/v, untied lm_head) through every stage, from the CLI:
capture plain and --sequential, --sequential --propagate --objective output, reduce, solve
in every --format, compress, eval and load_output. The real Qwen2.5-Coder models are in
docs/benchmarks.md (tools/stage_qwen.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from coala_stream.cli import main
from coala_stream.evaluate import evaluate
from coala_stream.export import load_output
from coala_stream.store import open_store

from .test_capture import text_file  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--samples", "4", "--seq-len", "32", "--threads", "1"]
IDS = torch.arange(3, 40).unsqueeze(0)
QKV = ("q_proj", "k_proj", "v_proj")


@pytest.fixture(scope="module")
def qwen(tiny_arch_dir, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("qwen2") / "m"  # a copy: the session's model is shared
    shutil.copytree(tiny_arch_dir("qwen2", tie_word_embeddings=False), path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in QKV) and attn.o_proj.bias is None
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # random biases: a zero-initialised one would hide a writer that drops it
    with torch.no_grad():
        for layer in model.model.layers:
            for p in QKV:
                getattr(layer.self_attn, p).bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def stores(qwen, text_file, tmp_path_factory):  # noqa: F811
    path, _ = qwen
    root = tmp_path_factory.mktemp("qwen-stores")
    base = [str(path), "--data", str(text_file), *SMALL]
    assert main(["capture", *base, "--out", str(root / "plain.zarr")]) == 0
    assert main(["capture", *base, "--out", str(root / "seq.zarr"), "--sequential"]) == 0
    assert main(["reduce", str(root / "plain.zarr"), "--threads", "1"]) == 0
    return root


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_sequential_capture_equals_plain(stores):
    with open_store(stores / "plain.zarr") as a, open_store(stores / "seq.zarr") as b:
        assert a.inputs == b.inputs and len(a.inputs) == 8  # q/k/v share one input
        for name in a.inputs:
            assert torch.equal(torch.cat(list(a.iter_chunks(name))),
                               torch.cat(list(b.iter_chunks(name)))), name


@pytest.mark.parametrize("fmt", ["factorized", "dense", "peft"])
def test_solve_every_format_keeps_biases_and_untied_head(fmt, qwen, stores, text_file,  # noqa: F811
                                                         tmp_path):
    _, original = qwen
    out = tmp_path / fmt
    assert main(["solve", str(stores / "plain.zarr"), "--out", str(out), "--ratio", "0.3",
                 "--format", fmt, "--threads", "1"]) == 0
    model = load_output(out)
    state = model.state_dict()
    want = original.state_dict()
    for p in QKV:
        key = f"model.layers.1.self_attn.{p}.bias"
        got = [v for k, v in state.items() if k.endswith(key) or k.endswith(key.replace(
            ".bias", ".A.bias")) or k.endswith(key.replace(".bias", ".base_layer.bias"))]
        assert len(got) == 1 and torch.equal(got[0], want[key]), (p, [k for k in state if p in k])
    head = [v for k, v in state.items() if k.endswith("lm_head.weight")]
    assert len(head) == 1 and torch.equal(head[0], want["lm_head.weight"])
    logits, ref = _logits(model), _logits(original)
    assert torch.isfinite(logits).all()
    if fmt == "peft":  # base + adapter: the original model, to float32 rounding
        assert torch.allclose(logits, ref, atol=1e-4)
    res = evaluate(model=str(out), data=str(text_file), seq_len=32, max_windows=2,
                   threads=1, progress=False)
    assert res.model_format == fmt and res.ppl > 1 and res.bos_token_id is None


def test_factorized_and_dense_compute_the_same_model(stores, tmp_path):
    for fmt in ("factorized", "dense"):
        assert main(["solve", str(stores / "plain.zarr"), "--out", str(tmp_path / fmt),
                     "--ratio", "0.3", "--format", fmt, "--threads", "1"]) == 0
    a, b = _logits(load_output(tmp_path / "factorized")), _logits(load_output(tmp_path / "dense"))
    assert torch.allclose(a, b, atol=1e-4)


def test_propagating_capture_output_objective_then_solve(qwen, text_file, tmp_path):  # noqa: F811
    path, original = qwen
    store = tmp_path / "prop.zarr"
    assert main(["capture", str(path), "--data", str(text_file), *SMALL, "--out", str(store),
                 "--sequential", "--propagate", "--objective", "output", "--ratio", "0.3"]) == 0
    assert main(["solve", str(store), "--out", str(tmp_path / "o"), "--ratio", "0.3",
                 "--threads", "1"]) == 0
    model = load_output(tmp_path / "o")
    logits = _logits(model)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, _logits(original))


def test_compress_and_eval(qwen, text_file, tmp_path, capsys):  # noqa: F811
    path, _ = qwen
    out = tmp_path / "c"
    assert main(["compress", str(path), "--data", str(text_file), *SMALL, "--out", str(out),
                 "--ratio", "0.3", "--refine-steps", "2", "--allocate", "uniform"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(text_file), "--seq-len", "32",
                 "--max-windows", "2", "--quiet", "--threads", "1"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("ppl ") and "factorized" in line and "BOS" not in line
