"""A second architecture offline: a Llama-style checkpoint rewritten as Phi-3 (fused projections).

No second decoder LLM ships offline (../shared/models.md), so the quality table's second
architecture is built: SmolLM2-135M's weights in transformers' ``Phi3ForCausalLM`` layout,
where each block has ONE ``qkv_proj`` (q, k and v stacked, 960 x 576) and ONE
``gate_up_proj`` (gate and up stacked, 3072 x 576) instead of three and two linears. The
uncompressed function is the same (checked here: logits agree to float32 rounding), but
what a compressor sees differs: every fused matrix gets one low-rank factorization, so the
parameters saved per rank, the singular spectra and the propagation groups (qkv_proj,
o_proj, gate_up_proj, down_proj) are Phi-3's, not Llama's.

    python tools/stage_phi3.py runs/q17/smollm2-135m-hf runs/q17-phi3/smollm2-as-phi3

(``tools/bench_propagate.py`` stages the Llama directory.) Not a test; writes float32
safetensors, config and tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM


def phi3_config(llama) -> Phi3Config:
    c = llama.config
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_type": "default",
                                                        "rope_theta": c.rope_theta})
    return Phi3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        original_max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=rope, partial_rotary_factor=1.0,
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, sliding_window=None,
        architectures=["Phi3ForCausalLM"],
    )


def fused_state(llama) -> dict[str, torch.Tensor]:
    """Llama's state dict with each block's q/k/v and gate/up stacked row-wise, in the
    order Phi-3's forward splits them (q, k, v; gate, up)."""
    out = {}
    for name, t in llama.state_dict().items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name or ".mlp.up_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            parts = [llama.state_dict()[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(parts, 0)
        elif ".mlp.gate_proj." in name:
            parts = [llama.state_dict()[name.replace("gate_proj", p)] for p in ("gate_proj", "up_proj")]
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat(parts, 0)
        else:
            out[name] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a Llama-style HF directory (safetensors)")
    ap.add_argument("target", type=Path, help="where the Phi-3 directory is written")
    args = ap.parse_args()
    llama = LlamaForCausalLM.from_pretrained(args.source, dtype=torch.float32, local_files_only=True).eval()
    if llama.config.attention_bias or getattr(llama.config, "mlp_bias", False):
        sys.exit("stage_phi3: the source has biases; Phi-3's fused linears here have none")
    phi = Phi3ForCausalLM(phi3_config(llama)).eval()
    missing, unexpected = phi.load_state_dict(fused_state(llama), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        sys.exit(f"stage_phi3: weights do not map: missing {missing}, unexpected {unexpected}")
    phi.tie_weights()
    ids = torch.randint(0, llama.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = llama(ids).logits, phi(ids).logits
    err = (ref - got).abs().max().item() / ref.abs().max().item()
    if err > 1e-4:
        sys.exit(f"stage_phi3: the Phi-3 model does not compute what the source does (rel. error {err:.2e})")
    phi.save_pretrained(args.target)
    AutoTokenizer.from_pretrained(args.source, local_files_only=True).save_pretrained(args.target)
    print(f"wrote {args.target} (Phi3ForCausalLM, logits agree with the source to {err:.1e})")


if __name__ == "__main__":
    main()
