"""GGUF sources: a tiny Qwen2 written as a real GGUF file (gguf.GGUFWriter, float32 tensors,
a gpt2-style BPE tokenizer, untied output) and run through every stage that loads or
re-saves it: capture, solve in every format (which re-saves the source as safetensors),
compress and eval.

transformers 5.x leaves its GGUF quantizer on such a model although every weight is plain
float32, so its ``save_pretrained`` refuses ("quantized with gguf and is not
serializable"); `models.load_model` removes the quantizer after checking the weights, and
refuses a model whose weights are still packed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coala_stream import models
from coala_stream.cli import main
from coala_stream.errors import CoalaError
from coala_stream.export import load_output

from .test_capture import text_file  # noqa: F401

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--samples", "4", "--seq-len", "32", "--threads", "1"]
IDS = torch.arange(3, 40).unsqueeze(0)
# transformers module name -> llama.cpp's tensor name within blk.N
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(key: str) -> str:
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    parts = key.split(".")  # model.layers.I.<module>.<weight|bias>
    return f"blk.{parts[2]}.{BLOCK_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def _tokenizer_fields(writer, model_dir: Path) -> None:
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    vocab.update({a["content"]: a["id"] for a in tj.get("added_tokens", [])})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])  # 3: control
    merges = tj["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])


def write_qwen2_gguf(model, model_dir: Path, path: Path) -> None:
    """``model`` (a Qwen2ForCausalLM) and ``model_dir``'s tokenizer as a float32 GGUF file."""
    c = model.config
    rope = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(rope))
    _tokenizer_fields(w, model_dir)
    for key, t in model.state_dict().items():
        w.add_tensor(gguf_name(key), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(tiny_arch_dir, tmp_path_factory):
    """(path of the GGUF file, the model it was written from)."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_arch_dir("qwen2", tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero biases, so a dropped one shows
            for p in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, p).bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.F32.gguf"
    write_qwen2_gguf(model, model_dir, path)
    return path, model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_loaded_gguf_is_the_model_and_saves(source, tmp_path):
    from transformers import AutoModelForCausalLM

    path, ref = source
    raw = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32)
    if getattr(raw, "hf_quantizer", None) is not None:  # the trap, as transformers 5 sets it
        with pytest.raises(ValueError, match="not serializable"):
            raw.save_pretrained(tmp_path / "raw")
    spec = models.ModelSpec.from_args(path)
    model = models.load_model(spec, "float32", config=models.load_config(spec))
    assert getattr(model, "hf_quantizer", None) is None
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.config.tie_word_embeddings
    assert torch.equal(_logits(model), _logits(ref))
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(_logits(again), _logits(ref))


def test_packed_weights_are_refused_not_saved():
    """A model with transformers' quantizer on it and a weight still in packed blocks
    (simulated: a uint8 buffer; no supported architecture keeps them packed on a CPU)."""
    net = torch.nn.Linear(4, 4)
    net.register_buffer("qweight", torch.zeros(8, dtype=torch.uint8))
    net.hf_quantizer = object()
    with pytest.raises(CoalaError, match="1 weights in packed GGUF blocks .*qweight"):
        models.release_gguf_quantizer(net, "x.gguf")
    # a bool mask buffer (GPT-2's attn.bias) is no packed weight: the quantizer is released
    masked = torch.nn.Linear(4, 4)
    masked.register_buffer("bias_mask", torch.ones(4, 4, dtype=torch.bool))

    class Quantizer:
        def remove_quantization_config(self, model):
            model.released = True

    masked.hf_quantizer = Quantizer()
    assert models.release_gguf_quantizer(masked, "x.gguf").released


@pytest.fixture(scope="module")
def store(source, text_file, tmp_path_factory):  # noqa: F811
    path, _ = source
    out = tmp_path_factory.mktemp("gguf-store") / "s.zarr"
    assert main(["capture", str(path), "--data", str(text_file), *SMALL, "--out", str(out)]) == 0
    assert main(["reduce", str(out), "--threads", "1"]) == 0
    return out


def test_solve_every_format_from_a_gguf_source(source, store, tmp_path, capsys):
    _, ref = source
    got = {}
    for fmt in ("factorized", "dense", "peft"):
        assert main(["solve", str(store), "--out", str(tmp_path / fmt), "--ratio", "0.3",
                     "--format", fmt, "--threads", "1"]) == 0, capsys.readouterr().err
        got[fmt] = _logits(load_output(tmp_path / fmt))
    assert torch.allclose(got["factorized"], got["dense"], atol=1e-4)
    assert torch.allclose(got["peft"], _logits(ref), atol=1e-4)  # base + adapter = the source
    assert not torch.allclose(got["dense"], _logits(ref), atol=1e-3)


def test_compress_and_eval_a_gguf_source(source, text_file, tmp_path, capsys):  # noqa: F811
    path, _ = source
    out = tmp_path / "c"
    assert main(["compress", str(path), "--data", str(text_file), *SMALL, "--out", str(out),
                 "--ratio", "0.3", "--refine-steps", "2", "--format", "dense",
                 "--allocate", "uniform"]) == 0
    capsys.readouterr()
    for model in (path, out):
        assert main(["eval", str(model), "--data", str(text_file), "--seq-len", "32",
                     "--max-windows", "2", "--quiet", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "gguf" in lines[0] and "dense" in lines[1]


def test_compress_de_quantises_a_gguf_source_once_with_the_same_result(source, text_file,
                                                                       tmp_path, monkeypatch):  # noqa: F811
    """compress loaded a GGUF source whole in each step (the plain capture, the allocation,
    the gradient pass, the propagating capture, solve's staging); now once, into the work
    directory, and every step reads that copy block by block. The output is the one the
    whole-model path gives."""
    import contextlib

    from safetensors.torch import load_file

    from coala_stream import compress as compress_module

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    path, _ = source
    argv = ["compress", str(path), "--data", str(text_file), *SMALL, "--ratio", "0.3",
            "--refine-steps", "1", "--format", "dense"]
    assert main([*argv, "--out", str(tmp_path / "once")]) == 0
    assert len(loads) == 1
    monkeypatch.setattr(compress_module, "staged_sources", lambda *a: contextlib.nullcontext())
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert len(loads) > 3  # what the staging saves
    once = load_file(tmp_path / "once" / "model.safetensors")
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    assert once.keys() == whole.keys()
    assert all(torch.equal(once[k], whole[k]) for k in once)
    assert not (tmp_path / "once.work").exists()


def test_a_staged_source_is_reused_until_its_file_changes(source, tmp_path, monkeypatch):
    import os

    from coala_stream import weights

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    path, ref = source
    spec = models.ModelSpec.from_args(str(path))
    (tmp_path / "src.partial").mkdir()  # a copy killed half-way is replaced
    (tmp_path / "src.partial" / "junk").write_text("x")
    with weights.staged_sources(tmp_path / "src"):
        first = weights.LazyWeights.find(spec)
        again, note = weights.open_weights(spec, None, tmp_path / "unused")
    assert len(loads) == 1 and "re-saved as safetensors in" in note
    assert first.dir == again.dir == tmp_path / "src" and not (tmp_path / "src.partial").exists()
    torch.testing.assert_close(first.get("model.layers.0.self_attn.q_proj.bias"),
                               ref.model.layers[0].self_attn.q_proj.bias, rtol=0, atol=0)
    assert weights.LazyWeights.find(spec) is None  # outside the block: nothing staged
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with weights.staged_sources(tmp_path / "src"):
            weights.LazyWeights.find(spec)
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(loads) == 2


def test_a_quiet_load_draws_no_gguf_bar(source, capfd):
    """transformers' GGUF conversion bar ignores its own disable_progress_bar: a --quiet
    compress printed it once per load."""
    path, _ = source
    models.load_model(models.ModelSpec.from_args(str(path)), "float32", progress=False)
    assert "GGUF" not in capfd.readouterr().err
