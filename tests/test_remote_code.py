"""remote_code: factorized outputs load in vanilla transformers with trust_remote_code=True.

Each test lays a factorized directory out by hand, as export.FactorizedWriter
does (``<m>.B.weight``, ``<m>.A.weight``, ``<m>.A.bias``; config.json = the model
config + our section with the ranks), then applies `remote_code`. The reference
is the same model in memory. Transformers' module cache is redirected to a tmp
dir, so nothing is read from or left in ~/.cache/huggingface/modules.
"""

from __future__ import annotations

import ast
import json
import sys

import pytest
import torch
from torch import nn

from coala_stream.export.remote_code import MODEL_TYPE, MODULE_FILE, base_config, remote_code

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)
LLAMA_RANKS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.mlp.down_proj": 5,
               "model.layers.1.self_attn.o_proj": 3}
QWEN2_RANKS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 4,
               "model.layers.1.self_attn.k_proj": 2, "model.layers.1.mlp.up_proj": 6}


class _LowRank(nn.Module):  # same parameter names as coala-stream's LowRankLinear
    def __init__(self, old: nn.Linear, rank: int):
        super().__init__()
        self.B = nn.Linear(old.in_features, rank, bias=False)
        self.A = nn.Linear(rank, old.out_features, bias=old.bias is not None)
        for p in self.parameters():
            nn.init.normal_(p, std=0.1)

    def forward(self, x):
        return self.A(self.B(x))


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Transformers' dynamic-module cache in a tmp dir (it copies MODULE_FILE there)."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # init_hf_modules appends the cache
    monkeypatch.setattr(dmu, "TIME_OUT_REMOTE_CODE", 0)  # never prompt "[y/N]", even under -s
    return tmp_path / "hf-modules"


def _factorized_dir(out, model_type: str, ranks: dict[str, int], **overrides):
    """(in-memory reference model, old-style config dict): ``out`` holds the factorized
    checkpoint and the config.json + module file that `remote_code` makes of it."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    for name, rank in ranks.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _LowRank(model.get_submodule(name), rank))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # saved once, under the embedding's name
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    old = {**model.config.to_dict(), "architectures": [type(model).__name__],
           "coala_stream": {"format": "factorized", "format_version": 1, "tool_version": "test",
                            "ranks": ranks}}
    new, files = remote_code(old)
    (out / "config.json").write_text(json.dumps(new, indent=2))
    for name, text in files.items():
        (out / name).write_text(text)
    return model.eval(), old


def _load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)


IDS = torch.tensor([[1, 17, 42, 250, 3, 99, 7], [5, 6, 7, 8, 9, 10, 11]])


def test_llama_loads_with_trust_remote_code(tmp_path, modules_cache):
    ref, _ = _factorized_dir(tmp_path / "llama-factorized", "llama", LLAMA_RANKS,
                             tie_word_embeddings=True)
    model, info = _load(tmp_path / "llama-factorized", trust_remote_code=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing / unexpected / mismatched keys
    assert model.config.model_type == MODEL_TYPE
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LowRankLinear"
    assert model.model.layers[0].self_attn.q_proj.B.weight.shape == (8, 64)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.allclose(model.eval()(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-6)
    assert modules_cache.is_dir()  # the redirect took effect


@pytest.mark.parametrize("trust", [False, None])
def test_without_trust_remote_code_refuses(tmp_path, modules_cache, trust):
    _factorized_dir(tmp_path / "refused", "llama", LLAMA_RANKS)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        _load(tmp_path / "refused", trust_remote_code=trust)


def test_qwen2_biases_round_trip_and_resave(tmp_path, modules_cache):
    ref, old = _factorized_dir(tmp_path / "qwen2-factorized", "qwen2", QWEN2_RANKS,
                               tie_word_embeddings=False)
    model, info = _load(tmp_path / "qwen2-factorized", trust_remote_code=True)
    assert {k: v for k, v in info.items() if v} == {}
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.A.bias, ref.model.layers[0].self_attn.q_proj.A.bias)  # bias rides on A
    with torch.no_grad():
        assert torch.allclose(model.eval()(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-6)
    # transformers' own save_pretrained keeps the module file and auto_map: still loadable
    model.save_pretrained(tmp_path / "qwen2-resaved")
    again, _ = _load(tmp_path / "qwen2-resaved", trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(again.eval()(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-6)
    resaved = json.loads((tmp_path / "qwen2-resaved" / "config.json").read_text())
    assert type(base_config(resaved)).__name__ == "Qwen2Config"
    assert base_config(resaved).architectures == ["Qwen2ForCausalLM"]


def _load_base(path, **kwargs):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)


@pytest.mark.parametrize("model_type,ranks,tied", [("llama", LLAMA_RANKS, True),
                                                    ("qwen2", QWEN2_RANKS, False)])
def test_auto_model_is_the_low_rank_base_and_attention_backends_agree(
        tmp_path, modules_cache, model_type, ranks, tied):
    """What the engines' Transformers backend loads: AutoModel -> our base-model class (the
    low-rank layers inside, the base architecture's attention), and the causal LM built on it;
    sdpa and eager give the same outputs as the in-memory reference."""
    path = tmp_path / f"{model_type}-factorized"
    ref, _ = _factorized_dir(path, model_type, ranks, tie_word_embeddings=tied)
    with torch.no_grad():
        ref_hidden, ref_logits = ref.model(IDS).last_hidden_state, ref(IDS).logits
    for attn in ("sdpa", "eager"):
        base, info = _load_base(path, trust_remote_code=True, attn_implementation=attn)
        assert type(base).__name__ == "CoalaStreamModel" and base._supports_attention_backend
        assert base.config._attn_implementation == attn
        assert not info["missing_keys"] and not info["mismatched_keys"]
        assert set(info["unexpected_keys"]) <= {"lm_head.weight"}  # the head is not the base's
        assert type(base.layers[0].self_attn).__name__ == type(ref.model.layers[0].self_attn).__name__
        causal, info = _load(path, trust_remote_code=True, attn_implementation=attn)
        assert {k: v for k, v in info.items() if v} == {}
        assert type(causal.model).__name__ == "CoalaStreamModel" and causal._supports_attention_backend
        for name, rank in ranks.items():
            inner = name.removeprefix("model.")
            assert base.get_submodule(inner).B.weight.shape[0] == rank
            assert causal.get_submodule(name).B.weight.shape[0] == rank
        with torch.no_grad():
            assert torch.allclose(base.eval()(IDS).last_hidden_state, ref_hidden, rtol=0, atol=1e-5)
            assert torch.allclose(causal.eval()(IDS).logits, ref_logits, rtol=0, atol=1e-5)
    assert causal.lm_head.weight is causal.model.embed_tokens.weight or not tied


def test_attention_goes_through_the_interface_with_kwargs_passed_down(tmp_path, modules_cache,
                                                                      monkeypatch):
    """A backend registered in ALL_ATTENTION_FUNCTIONS (as vLLM registers its own) is called by
    every layer of the AutoModel class, with the keyword arguments given to the model's forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs.get("coala_probe")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "coala_probe", probe)
    path = tmp_path / "probed"
    ref, _ = _factorized_dir(path, "llama", LLAMA_RANKS)
    base, _ = _load_base(path, trust_remote_code=True, attn_implementation="coala_probe")
    with torch.no_grad():
        out = base.eval()(IDS, coala_probe="passed").last_hidden_state
        assert torch.allclose(out, ref.model(IDS).last_hidden_state, rtol=0, atol=1e-5)
    assert seen == [(0, "passed"), (1, "passed")]


def test_outputs_of_earlier_versions_still_load(tmp_path, modules_cache):
    """load_output reads factorized outputs of every earlier form: with modeling code whose
    auto_map has no AutoModel (before the base-model class), and with none at all (the base
    model_type, before remote code); transformers still loads the former."""
    from coala_stream.export import load_output

    ref, old = _factorized_dir(tmp_path / "current", "qwen2", QWEN2_RANKS, tie_word_embeddings=False)
    previous = tmp_path / "previous"
    previous.mkdir()
    for f in ("model.safetensors", MODULE_FILE):
        (previous / f).write_bytes((tmp_path / "current" / f).read_bytes())
    config = json.loads((tmp_path / "current" / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (previous / "config.json").write_text(json.dumps(config))
    oldest = tmp_path / "oldest"
    oldest.mkdir()
    (oldest / "model.safetensors").write_bytes((tmp_path / "current" / "model.safetensors").read_bytes())
    (oldest / "config.json").write_text(json.dumps(old))
    with torch.no_grad():
        want = ref(IDS).logits
        for path in (tmp_path / "current", previous, oldest):
            assert torch.allclose(load_output(path)(IDS).logits, want, rtol=0, atol=1e-6), path
        model, info = _load(previous, trust_remote_code=True)
        assert {k: v for k, v in info.items() if v} == {}
        assert torch.allclose(model.eval()(IDS).logits, want, rtol=0, atol=1e-6)


def test_base_config_new_and_old_form():
    from transformers import LlamaConfig

    old = {**LlamaConfig(**TINY).to_dict(), "architectures": ["LlamaForCausalLM"],
           "coala_stream": {"format": "factorized", "ranks": LLAMA_RANKS}}
    new, _ = remote_code(old)
    assert new["model_type"] == MODEL_TYPE and old["model_type"] == "llama"  # input untouched
    assert new["coala_stream"]["base_model_type"] == "llama"
    assert new["auto_map"]["AutoModelForCausalLM"] == "modeling_coala_stream.CoalaStreamForCausalLM"
    assert new["auto_map"]["AutoModel"] == "modeling_coala_stream.CoalaStreamModel"
    for form in (new, old):
        cfg = base_config(form)
        assert type(cfg) is LlamaConfig and cfg.model_type == "llama"
        assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.vocab_size) == (64, 2, 256)
        assert cfg.architectures == ["LlamaForCausalLM"]
        assert cfg.coala_stream["ranks"] == LLAMA_RANKS
        assert not hasattr(cfg, "auto_map") or not cfg.auto_map
    assert remote_code(new) == remote_code(old)  # idempotent


def test_module_needs_only_torch_and_transformers():
    from transformers import Qwen2Config

    old = {**Qwen2Config(**TINY).to_dict(), "architectures": ["Qwen2ForCausalLM"],
           "coala_stream": {"format": "factorized", "ranks": QWEN2_RANKS}}
    _, files = remote_code(old)
    tree = ast.parse(files[MODULE_FILE])
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert roots == {"torch", "transformers"}
    assert "from transformers import Qwen2ForCausalLM as _BaseModel" in files[MODULE_FILE]
    assert "from transformers import Qwen2Model as _BaseBackbone" in files[MODULE_FILE]
    assert files[MODULE_FILE].count("_supports_attention_backend = True") == 2


def test_refuses_configs_it_cannot_serve():
    with pytest.raises(ValueError, match="factorized"):
        remote_code({"model_type": "llama", "coala_stream": {"format": "dense"}})
    with pytest.raises(ValueError, match="not a causal LM"):
        remote_code({"model_type": "not_a_model", "coala_stream": {"format": "factorized", "ranks": {}}})
    with pytest.raises(ValueError, match="not known"):
        base_config({"model_type": "not_a_model"})


def test_a_factorized_head_outside_the_base_model_is_swapped_by_the_causal_lm(tmp_path,
                                                                              modules_cache):
    ranks = {**LLAMA_RANKS, "lm_head": 7}  # not under the base model's prefix
    ref, _ = _factorized_dir(tmp_path / "head", "llama", ranks, tie_word_embeddings=False)
    model, info = _load(tmp_path / "head", trust_remote_code=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.lm_head.B.weight.shape == (7, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(IDS).logits, ref(IDS).logits, rtol=0, atol=1e-6)
