"""Loading solve's outputs back: `load_output` for every format (alias `load_model`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import models
from .._version import __version__
from ..errors import CoalaError
from ..weights import LazyWeights
from .lowrank import swap_in_low_rank
from .remote_code import base_config
from .writers import ADAPTER_CONFIG, FORMAT_VERSION, SECTION


def detect_format(path: str | os.PathLike) -> str | None:
    """What a directory holds: 'peft', 'factorized', 'dense' (a solve output), 'hf'
    (another Hugging Face model directory) or None."""
    path = Path(path)
    if (path / "adapter" / ADAPTER_CONFIG).is_file() and (path / "base" / "config.json").is_file():
        return "peft"
    if not (path / "config.json").is_file():
        return None
    section = _section(path)
    if section is None:
        return "hf"
    return {"factorized": "factorized", "dense": "dense", "peft-base": "dense"}.get(
        section.get("format"), "hf")


def _section(path: Path) -> dict | None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CoalaError(f"cannot read {path / 'config.json'}: {exc}") from exc
    section = config.get(SECTION)
    if section is not None and int(section.get("format_version", 0)) > FORMAT_VERSION:
        raise CoalaError(f"{path} was written by coala-stream {section.get('tool_version')} in "
                         f"format version {section['format_version']}; this coala-stream "
                         f"{__version__} reads up to {FORMAT_VERSION}: upgrade coala-stream")
    return section


def _torch_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return dtype


def load_output(path: str | os.PathLike, dtype=None, device="cpu"):
    """Load any solve output (factorized, dense, peft) or a Hugging Face model directory.

    Factorized: ``from_config`` (no weight init), each module listed in the
    config's ``coala_stream.ranks`` swapped for a `LowRankLinear`, weights
    loaded strictly (only tied weights such as lm_head may be absent; they are
    re-tied). Peft: the base model wrapped by ``peft.PeftModel.from_pretrained``.
    ``dtype``: None/"auto" keeps the saved dtype. Returns the model in eval mode.
    """
    path = Path(path)
    kind = detect_format(path)
    if kind is None:
        raise CoalaError(f"{path} is not a model directory (no config.json, and not a peft output "
                         f"with base/ and adapter/)")
    with models.offline():
        if kind == "factorized":
            model = _load_factorized(path, dtype)
        elif kind == "peft":
            model = _load_peft(path, dtype)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=False,
                                                         dtype=_torch_dtype(dtype, config))
    model.eval()
    return model.to(device)


def _load_factorized(path: Path, dtype):
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    # the base architecture's config: config.json names our modeling code, which only
    # plain transformers (with trust_remote_code) needs; here the swap is done directly
    config = base_config(json.loads((path / "config.json").read_text()))
    ranks = getattr(config, SECTION)["ranks"]
    torch_dtype = _torch_dtype(dtype, config)
    with no_init_weights():
        model = models.build_model(config, torch_dtype)
    swap_in_low_rank(model, ranks)
    source = LazyWeights(path)
    unexpected = []
    for shard in source.shards:
        tensors = {k: v.to(torch_dtype) for k, v in source.read_shard(shard).items()}
        # assign: the read tensors become the parameters (no second copy of the weights)
        result = model.load_state_dict(tensors, strict=False, assign=True)
        unexpected += result.unexpected_keys
    loaded = set(source.shard_of)
    missing = set(model.state_dict()) - loaded
    if unexpected:
        raise CoalaError(f"{path}: the checkpoint holds tensors the rebuilt model has no place "
                         f"for: {sorted(unexpected)[:5]}")
    model.tie_weights()
    tied = set(getattr(model, "all_tied_weights_keys", None) or
               getattr(model, "_tied_weights_keys", None) or {})
    if missing - tied:
        raise CoalaError(f"{path}: the checkpoint lacks tensors of the model: "
                         f"{sorted(missing - tied)[:5]}")
    return model


def _load_peft(path: Path, dtype):
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise CoalaError("loading a peft output needs the peft package: pip install "
                         "'coala-stream[peft]'") from exc
    base = load_output(path / "base", dtype=dtype)
    return PeftModel.from_pretrained(base, str(path / "adapter"))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a solve output (``base/`` for peft) or in an HF directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    kind = detect_format(path)
    if kind == "peft":
        path = path / "base"
    # A factorized config names our modeling code; AutoTokenizer would read it and warn that
    # it is "a model of type coala_stream_lowrank": give it the base architecture's config.
    extra = {"config": base_config(json.loads((path / "config.json").read_text()))} \
        if kind == "factorized" else {}
    try:
        with models.offline():
            return AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                 trust_remote_code=False, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise CoalaError(f"cannot load a tokenizer from {path}: {exc}") from exc


# The name earlier versions exported; `load_output` says what it loads (solve's outputs,
# or any Hugging Face directory), unlike the source-model loader `models.load_model`.
load_model = load_output
