"""Writing solve's results: factorized, dense and peft outputs, looked up by name in `WRITERS`.

- ``factorized``: every compressed ``nn.Linear`` becomes a `LowRankLinear`
  (``B``: in -> rank, no bias; ``A``: rank -> out, with the original bias), so
  file size and parameter count really shrink. A Hugging Face directory
  (safetensors + config.json) whose config carries a ``coala_stream`` section
  (`SECTION`) with the rank of every factorized module, plus the modeling code
  (`remote_code`) that lets plain transformers load it with
  ``trust_remote_code=True``. Tensor keys: ``<module>.B.weight`` (r x n),
  ``<module>.A.weight`` (m x r), ``<module>.A.bias`` (m).
- ``dense``: ``W' = A @ B`` written in place of ``W``: an ordinary checkpoint
  that vanilla ``AutoModelForCausalLM.from_pretrained`` loads.
- ``peft``: ``DIR/base`` holds the residual ``W - A @ B`` as an ordinary
  checkpoint, ``DIR/adapter`` a LoRA adapter (PEFT's format: keys
  ``base_model.model.<module>.lora_A.weight`` = B (r x n) and ``...lora_B.weight``
  = A (m x r), ``lora_alpha = r`` so the scaling is 1). Before any training,
  base + adapter reproduces the original weights (to the rounding of the base dtype).

Writers stream: they are fed one source shard at a time (`weights.LazyWeights`), a
shard larger than `weights.SHARD_BYTES` in pieces, so memory holds one such piece plus one
layer's factors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._version import __version__
from ..files import save_safetensors, write_json
from ..weights import LazyWeights, shard_names, split_by_size, write_index
from .remote_code import remote_code

SECTION = "coala_stream"  # the config.json key of our metadata
FORMAT_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "solve_report.json"


class Writer:
    """Common part: the source's shard layout (a shard over `SHARD_BYTES` split), config.json
    with our section, aux files.

    Use: ``writer.write(layers, factor)`` then ``writer.finish(section)``.
    """

    format = ""
    weights_subdir = ""

    def __init__(self, out: Path, source: LazyWeights, final_dir: Path | None = None):
        self.out, self.source = Path(out), source
        self.final_dir = Path(final_dir if final_dir is not None else out)  # where out will be published
        self.weights_dir = self.out / self.weights_subdir if self.weights_subdir else self.out
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, layers: list[str], factor) -> None:
        """Stream the source shard by shard; ``factor(name, W) -> (A, B)`` for each listed
        layer (called in the order of ``layers`` within each shard), everything else copied.
        A source shard larger than `weights.SHARD_BYTES` is written as several (then every
        output shard takes transformers' ``model-0000i-of-0000N`` name).

        Memory: one output shard plus one layer's factors.
        """
        skip = self.skip_keys(layers)
        pieces = [group for shard in self.source.shards
                  for group in split_by_size([k for k in self.source.keys_of[shard]
                                              if k not in skip], self.source.nbytes)]
        names = (self.source.shards if len(pieces) == len(self.source.shards)
                 else shard_names(len(pieces)))
        for out_name, keys in zip(names, pieces):
            tensors = self.source.read(keys)
            for name in (n for n in layers if f"{n}.weight" in tensors):
                W = tensors[f"{name}.weight"]
                A, B = factor(name, W)
                self.write_layer(tensors, name, W, A, B)
            self.write_shard(out_name, tensors)

    def skip_keys(self, layers: list[str]) -> set[str]:
        """Source keys not to copy verbatim (they move with their layer)."""
        return set()

    def write_layer(self, tensors: dict, name: str, W: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor) -> None:
        raise NotImplementedError

    def write_shard(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_safetensors(tensors, self.weights_dir / shard)
        for k, v in tensors.items():
            self.weight_map[k] = shard
            self.total_size += v.numel() * v.element_size()

    def finish(self, section: dict) -> None:
        if self.source.sharded or len(set(self.weight_map.values())) > 1:
            write_index(self.weights_dir, self.weight_map, self.total_size)
        config = self.source.config()
        config[SECTION] = {"format": self.format, "format_version": FORMAT_VERSION,
                           "tool_version": __version__, **section}
        self.write_config(config)
        self.source.copy_aux_files(self.weights_dir)

    def write_config(self, config: dict) -> None:
        write_json(self.weights_dir / "config.json", config)


class DenseWriter(Writer):
    """W' = A @ B in place of W: loads with vanilla transformers."""

    format = "dense"

    def write_layer(self, tensors, name, W, A, B):
        tensors[f"{name}.weight"] = (A @ B).to(W.dtype)


class FactorizedWriter(Writer):
    """``<name>.weight`` -> ``<name>.B.weight`` + ``<name>.A.weight`` (+ ``<name>.A.bias``)."""

    format = "factorized"

    def __init__(self, out, source, final_dir=None):
        super().__init__(out, source, final_dir)
        self.ranks: dict[str, int] = {}

    def skip_keys(self, layers):
        return {f"{name}.bias" for name in layers}  # may sit in another shard than the weight

    def write_layer(self, tensors, name, W, A, B):
        del tensors[f"{name}.weight"]
        tensors[f"{name}.B.weight"] = B.to(W.dtype)
        tensors[f"{name}.A.weight"] = A.to(W.dtype)
        if f"{name}.bias" in self.source:
            tensors[f"{name}.A.bias"] = self.source.get(f"{name}.bias")
        self.ranks[name] = int(B.shape[0])

    def finish(self, section):
        super().finish({**section, "ranks": self.ranks})

    def write_config(self, config: dict) -> None:
        # modeling code beside the weights, so plain transformers loads the output with
        # trust_remote_code=True (and refuses it without, instead of loading random weights)
        config, files = remote_code(config)
        for name, text in files.items():
            (self.weights_dir / name).write_text(text)
        write_json(self.weights_dir / "config.json", config)


class PeftWriter(Writer):
    """Residual base (``DIR/base``) + LoRA adapter (``DIR/adapter``) in PEFT's format."""

    format = "peft-base"
    weights_subdir = "base"

    def __init__(self, out, source, final_dir=None):
        super().__init__(out, source, final_dir)
        self.adapter: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}

    def write_layer(self, tensors, name, W, A, B):
        tensors[f"{name}.weight"] = (W.to(A.dtype) - A @ B).to(W.dtype)
        # PEFT: delta = lora_B @ lora_A * scaling; lora_A (r x in) = B, lora_B (out x r) = A.
        self.adapter[f"base_model.model.{name}.lora_A.weight"] = B.float().contiguous()
        self.adapter[f"base_model.model.{name}.lora_B.weight"] = A.float().contiguous()
        self.ranks[name] = int(B.shape[0])

    def finish(self, section):
        super().finish({**section, "ranks": self.ranks})
        adapter_dir = self.out / "adapter"
        adapter_dir.mkdir()
        save_safetensors(self.adapter, adapter_dir / ADAPTER_WEIGHTS)
        write_json(adapter_dir / ADAPTER_CONFIG,
                   # absolute: AutoPeftModel resolves it from wherever the adapter is used
                   adapter_config(self.ranks, str(Path(self.final_dir).resolve() / "base"),
                                  self.source.config()))


def adapter_config(ranks: dict[str, int], base_path: str, model_config: dict) -> dict:
    """PEFT LoRA config with scaling 1 for every module: lora_alpha = r (per-module via patterns).

    ``target_modules`` lists the full module names. The most common rank is
    ``r``; others go to ``rank_pattern`` / ``alpha_pattern`` (full names match
    exactly: PEFT tests ``(.*\\.)?<pattern>$``).
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 0
    pattern = {name: rk for name, rk in ranks.items() if rk != r}
    causal = any(a.endswith("ForCausalLM") for a in model_config.get("architectures") or [])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": base_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


WRITERS = {"factorized": FactorizedWriter, "dense": DenseWriter, "peft": PeftWriter}
