"""The one lazy reader of safetensors checkpoints, used by every stage that reads weights.

`LazyWeights` reads a Hugging Face checkpoint (one ``model.safetensors`` or an
index of shards) by tensor name: only the shard headers are parsed up front,
and a file is opened (memory-mapped) only while tensors are copied out of it,
so nothing stays resident between calls. The sequential capture reads one
decoder block at a time through it, solve one layer at a time, the writers
one shard at a time. `open_weights` gives one for any source model: the
model's own safetensors, or (GGUF, ``.bin``) the model loaded whole once and
re-saved as safetensors in a staging directory.

It lives below capture, solve and export (it needs only `models`), since all three read
weights; export adds the writers on top of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .errors import CoalaError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Small files of a model directory worth carrying over (tokenizer, generation defaults).
AUX_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
                       r"|merges\.txt|.*\.model|chat_template\..*|generation_config\.json|"
                       r"preprocessor_config\.json)$")


class LazyWeights:
    """The tensors of a safetensors checkpoint directory, read when asked for."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CoalaError(f"cannot read the checkpoint index {index}: {exc}") from exc
            self.shards, self.sharded = sorted(set(weight_map.values())), True
        elif (self.dir / SINGLE_FILE).is_file():
            self.shards, self.sharded = [SINGLE_FILE], False
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}")
        self.shard_of: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for shard in self.shards:
            with safe_open(str(self.dir / shard), framework="pt") as f:
                for key in f.keys():
                    self.shard_of[key] = shard
                    self._shape[key] = tuple(f.get_slice(key).get_shape())

    @staticmethod
    def is_checkpoint(directory: Path) -> bool:
        return (Path(directory) / INDEX_FILE).is_file() or (Path(directory) / SINGLE_FILE).is_file()

    @classmethod
    def find(cls, spec) -> "LazyWeights | None":
        """The checkpoint of a `models.ModelSpec` in safetensors format; None for GGUF models
        and other formats (pytorch_model.bin), which load whole."""
        d, gguf_file = spec.resolve()
        if gguf_file is not None or not cls.is_checkpoint(d):
            return None
        return cls(d)

    def __contains__(self, key: str) -> bool:
        return key in self.shard_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def key(self, name: str) -> str:
        """The checkpoint's name for the model's parameter ``name`` (a checkpoint of the
        base model lacks the ``model.`` prefix); CoalaError if it has none."""
        if name in self.shard_of:
            return name
        _, _, rest = name.partition(".")
        if rest in self.shard_of:
            return rest
        raise CoalaError(f"the checkpoint in {self.dir} has no tensor {name!r} (its names look "
                         f"like {next(iter(self.shard_of), 'nothing')!r}); capture without "
                         f"--sequential loads it through transformers' renaming rules")

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def read(self, names) -> dict[str, torch.Tensor]:
        """{name: CPU tensor as stored} for the model parameter ``names`` (a tensor maps the
        file privately until it is dropped: copy it where it belongs, then drop it)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.shard_of[self.key(name)], []).append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(self.dir / file), framework="pt", device="cpu") as f:
                for name in group:
                    out[name] = f.get_tensor(self.key(name))
        return out

    def read_shard(self, shard: str, skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.dir / shard), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k not in skip}

    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    def copy_aux_files(self, dest: Path) -> None:
        """Tokenizer files and generation_config.json (not weights, not config.json)."""
        for p in self.dir.iterdir():
            if p.is_file() and AUX_FILES.match(p.name):
                shutil.copy2(p, dest / p.name)


def open_weights(spec, model_config, stage: Path, say=lambda msg: None) -> tuple[LazyWeights, str]:
    """(LazyWeights of the source model, a note for the report or ""): the model's own
    safetensors, or (GGUF, .bin) the model loaded whole by transformers and re-saved as
    safetensors in ``stage`` (which the caller deletes)."""
    from . import models

    directory, gguf_file = spec.resolve()
    if gguf_file is None and LazyWeights.is_checkpoint(directory):
        return LazyWeights(directory), ""
    what = "de-quantising the GGUF weights" if gguf_file else "loading the weights"
    say(f"{spec.describe()}: {what} (whole model in memory) ...")
    model = models.load_model(spec, models.resolve_dtype("auto", model_config, spec),
                              config=model_config)
    save_loaded(model, stage)
    del model
    note = (f"source {spec.describe()} loaded whole by transformers ({what}) and re-saved "
            f"as safetensors; weights then read layer by layer")
    try:
        models.load_tokenizer(spec).save_pretrained(stage)
    except CoalaError as exc:
        note += f"; no tokenizer copied: {exc}"
    return LazyWeights(stage), note


def save_loaded(model, directory: Path) -> None:
    """Save an in-memory model as a plain single-file safetensors checkpoint.

    For sources transformers will not re-save (a de-quantised GGUF model is
    still flagged as quantized) or that are not safetensors. Tensors sharing
    storage (tied embeddings) are saved once, under their first name, as
    ``save_pretrained`` does; the config loses its ``quantization_config``.
    """
    from .files import save_safetensors, write_json

    directory.mkdir(parents=True)
    seen, state = set(), {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr not in seen:
            seen.add(ptr)
            state[key] = tensor.detach().to("cpu").contiguous()
    save_safetensors(state, directory / SINGLE_FILE)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    write_json(directory / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
