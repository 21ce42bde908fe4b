"""Fused projections (Phi-3: one qkv_proj, one gate_up_proj per block): the output objective's
propagation, refinement and solve on them, and the tool that builds the quality table's
second architecture (tools/stage_phi3.py) from a Llama-style checkpoint."""

from __future__ import annotations


import pytest
import torch

from coala_stream import applied
from coala_stream.export import load_output
from coala_stream.sequential import SequentialConfig
from coala_stream.sequential import run as run_capture
from coala_stream.solve import SolveConfig, run_solve
from coala_stream.store import open_store

from .test_capture import SMALL, text_file  # noqa: F401
from .tools import load_tool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tool():
    return load_tool("stage_phi3")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_stage_phi3_computes_what_the_llama_source_does(tiny_model_dir):
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    tool = _tool()
    llama = LlamaForCausalLM.from_pretrained(tiny_model_dir("float32"), dtype=torch.float32).eval()
    phi = Phi3ForCausalLM(tool.phi3_config(llama)).eval()
    missing, unexpected = phi.load_state_dict(tool.fused_state(llama), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    phi.tie_weights() if llama.config.tie_word_embeddings else phi.lm_head.load_state_dict(
        llama.lm_head.state_dict())
    names = {n for n, m in phi.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.0.mlp.gate_up_proj" in names
    assert not {n.rsplit(".", 1)[-1] for n in names} & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    ids = torch.randint(0, llama.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref, got = _logits(llama, ids), _logits(phi, ids)
    assert (ref - got).abs().max() <= 1e-5 * ref.abs().max()


def test_output_objective_propagates_through_fused_projections(tiny_arch_dir, text_file, tmp_path):
    """Phi-3's blocks: four groups per block, each fused matrix one factorization; solve
    writes the factors the propagation applied, and the output loads and runs."""
    model_dir = tiny_arch_dir("phi3", num_hidden_layers=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    out = tmp_path / "p.zarr"
    s = run_capture(SequentialConfig(out=str(out), model=str(model_dir), data=str(text_file),
                                     sequential=True, propagate=True, ratio=0.3, objective="output",
                                     alpha=0.5, refine_steps=2, **SMALL), progress=False)
    assert s["status"] == "complete" and s["blocks"] == 2
    assert s["propagate"]["compressed_layers"] == 8  # qkv, o, gate_up, down in each block
    with open_store(out) as st:
        consumers = sorted(c for n in st.inputs for c in st.input(n).consumers)
        assert all(st.input(n).pair for n in st.inputs)
        factors = applied.read_all(st)[0]
    assert consumers == sorted(factors) and len(factors) == 8
    hidden = 64  # TINY_LLAMA's hidden_size
    for name, (A, B) in factors.items():
        assert B.shape[1] == (160 if name.endswith("down_proj") else hidden)  # the inputs' width
        assert A.shape[1] == B.shape[0] < min(A.shape[0], B.shape[1])
    qkv = factors["model.layers.0.self_attn.qkv_proj"][0]
    assert qkv.shape[0] == hidden + 2 * hidden // 2  # q (4 heads) + k, v (2 kv heads) rows, fused

    report = run_solve(out, SolveConfig(out=str(tmp_path / "f"), ratio=0.3), progress=False)
    assert any("factors as the propagating capture applied them" in n for n in report["notes"])
    model = load_output(tmp_path / "f")
    dense = load_output(model_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    got, ref = _logits(model, ids), _logits(dense, ids)
    assert torch.isfinite(got).all() and not torch.equal(got, ref)
    assert (got - ref).norm() < ref.norm()  # compressed, not broken
