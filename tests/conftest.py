"""Shared fixtures: a tiny random-weight Llama and its tokenizer, built offline.

- ``tiny_tokenizer_dir``: a byte-level BPE tokenizer (vocab 384) trained in
  well under a second on a slice of CPython's pydoc topics, saved as a
  ``PreTrainedTokenizerFast`` directory (``AutoTokenizer`` loads it offline).
- ``tiny_model_dir(dtype="float32", **config_overrides)``: a factory that saves a
  random-weight ``LlamaForCausalLM`` (hidden 64, MLP 160, 2 layers, 4 heads /
  2 KV heads, vocab = the tokenizer's) plus the tokenizer into a directory and
  returns its path. Weights are drawn from a fixed seed, so the same arguments
  give the same model; each distinct argument set is built once per session.
- ``tiny_text(tmp_path)``-style helpers are left to each test module.

Everything is session-scoped and takes about a second in all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _train_tokenizer(out: Path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from coala_stream.calib import builtin_text

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([builtin_text()[:60_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """Directory of a tiny byte-level BPE tokenizer (any UTF-8 text encodes, no unknowns)."""
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    _train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_arch_dir):
    """Factory: ``tiny_model_dir(dtype="float32", seed=0, **LlamaConfig overrides) -> Path``.

    The directory holds config.json, model.safetensors and the tokenizer, so
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``coala-stream capture DIR``
    load it offline. ``dtype`` is "float32", "bfloat16" or "float16" (weights are
    drawn in float32 and rounded).
    """
    return lambda dtype="float32", seed=0, **overrides: tiny_arch_dir("llama", dtype, seed, **overrides)


@pytest.fixture(scope="session")
def tiny_arch_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: ``tiny_arch_dir("qwen2", dtype="float32", **config overrides) -> Path``: like
    ``tiny_model_dir`` for any ``model_type`` transformers knows (its *ForCausalLM), with
    the TINY_LLAMA sizes (keys the architecture does not use are kept as plain attributes)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    built: dict[tuple, Path] = {}
    vocab = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))

    def make(model_type: str, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
        key = (model_type, dtype, seed, tuple(sorted(overrides.items())))
        if key not in built:
            cfg = AutoConfig.for_model(model_type, **{**TINY_LLAMA, "vocab_size": vocab, **overrides})
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
            model.config.dtype = getattr(torch, dtype)
            out = tmp_path_factory.mktemp(f"tiny-{model_type}-{dtype}")
            model.save_pretrained(out)
            for f in tiny_tokenizer_dir.iterdir():
                shutil.copy(f, out / f.name)
            built[key] = out
        return built[key]

    return make


@pytest.fixture
def default_sigint():
    """SIGINT as an interactive shell starts a command (Python's KeyboardInterrupt handler, and
    SIG_DFL in the commands a test starts): a suite launched in the background (``nohup ...
    &``) inherits SIGINT ignored, which the CLI rightly keeps, so a test of what SIGINT does
    must set it first."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is fastest, and immune to other processes on shared cores.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    from coala_stream.devices import torch_threads

    with torch_threads(1):
        yield
