"""Refinement on the factors (issue 25): a block whose linears run as (x B^T) A^T gives the
outputs, gradients and Adam steps of the same block run with W = A B, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import AutoConfig, AutoModelForCausalLM

from coala_stream.sequential.refine import on_factors

from .conftest import TINY_LLAMA

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


@pytest.fixture(scope="module")
def block():
    """Block 0 of a random tiny Llama in float64, its rotary (cos, sin), and an input."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **{**TINY_LLAMA, "vocab_size": 64, "attention_bias": True})
    model = AutoModelForCausalLM.from_config(cfg).to(F64)
    x = torch.randn(2, 12, cfg.hidden_size, dtype=F64)
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    return model.model.layers[0], model.model.rotary_emb(x, pos), x


def _factors(blk, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, m in blk.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "mlp.down_proj":  # one stays dense
            A = torch.randn(m.out_features, rank, generator=g, dtype=F64) / rank ** 0.5
            B = torch.randn(rank, m.in_features, generator=g, dtype=F64) / m.in_features ** 0.5
            out["model.layers.0." + name] = (A.requires_grad_(True), B.requires_grad_(True))
    return out


def _run(blk, pe, x, params, factorized: bool) -> torch.Tensor:
    head = "model.layers.0."
    if factorized:
        with on_factors(blk, head, params, {n: F64 for n in params}):
            out = blk(x, position_embeddings=pe)
    else:
        overrides = {n[len(head):] + ".weight": A @ B for n, (A, B) in params.items()}
        out = functional_call(blk, overrides, (x,), {"position_embeddings": pe})
    return out[0] if isinstance(out, tuple) else out


def test_factorized_block_equals_the_dense_one_with_its_gradients(block):
    blk, pe, x = block
    y = torch.randn_like(x)
    grads = []
    for factorized in (False, True):
        params = _factors(blk, 5)
        out = _run(blk, pe, x, params, factorized)
        loss = torch.nn.functional.mse_loss(out, y)
        loss.backward()
        grads.append((out.detach(), [t.grad for ab in params.values() for t in ab]))
    (o1, g1), (o2, g2) = grads
    assert torch.allclose(o1, o2, rtol=1e-12, atol=1e-13)
    assert len(g1) == 12
    for a, b in zip(g1, g2):
        assert torch.linalg.norm(a - b) <= 1e-11 * torch.linalg.norm(a)


def test_adam_steps_on_the_factors_follow_the_dense_ones(block):
    blk, pe, x = block
    y = torch.randn_like(x)
    finals = []
    for factorized in (False, True):
        params = _factors(blk, 3)
        opt = torch.optim.Adam([t for ab in params.values() for t in ab], lr=1e-3)
        for _ in range(4):
            loss = torch.nn.functional.mse_loss(_run(blk, pe, x, params, factorized), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finals.append([t.detach() for ab in params.values() for t in ab])
    for a, b in zip(*finals):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_original_linears_come_back_even_after_an_error(block):
    blk, pe, x = block
    before = dict(blk.named_modules())
    params = _factors(blk, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with on_factors(blk, "model.layers.0.", params, {n: F64 for n in params}):
            assert type(blk.self_attn.q_proj).__name__ == "_OnFactors"
            raise RuntimeError("boom")
    after = dict(blk.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
