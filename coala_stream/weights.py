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
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CoalaError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Small files of a model directory worth carrying over (tokenizer, generation defaults).
AUX_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
                       r"|merges\.txt|.*\.model|chat_template\..*|generation_config\.json|"
                       r"preprocessor_config\.json)$")
# The most bytes of one written safetensors file: the writers (and `save_loaded`) hold one
# such shard in memory, and safetensors' save_file a second copy of it while writing, so a
# single 7 GB file of a 1.5B model cost 12 GiB. 1 GiB keeps that far below the model's size.
SHARD_BYTES = 1 << 30
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2}


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
        self.keys_of: dict[str, list[str]] = {}  # each shard's keys, in the file's order
        self._shape: dict[str, tuple[int, ...]] = {}
        self._nbytes: dict[str, int] = {}
        for shard in self.shards:
            with safe_open(str(self.dir / shard), framework="pt") as f:
                self.keys_of[shard] = list(f.keys())
                for key in self.keys_of[shard]:
                    self.shard_of[key] = shard
                    sl = f.get_slice(key)
                    self._shape[key] = tuple(sl.get_shape())
                    self._nbytes[key] = (_ITEMSIZE.get(sl.get_dtype(), 1)
                                         * int(torch.Size(self._shape[key]).numel()))

    @staticmethod
    def is_checkpoint(directory: Path) -> bool:
        return (Path(directory) / INDEX_FILE).is_file() or (Path(directory) / SINGLE_FILE).is_file()

    @classmethod
    def find(cls, spec) -> "LazyWeights | None":
        """The checkpoint of a `models.ModelSpec` in safetensors format; for GGUF models and
        other formats (pytorch_model.bin), which load whole, None, or inside `staged_sources`
        the staged copy."""
        d, gguf_file = spec.resolve()
        if gguf_file is None and cls.is_checkpoint(d):
            return cls(d)
        return stage_source(spec, *_STAGED[-1]) if _STAGED else None

    def __contains__(self, key: str) -> bool:
        return key in self.shard_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def nbytes(self, key: str) -> int:
        return self._nbytes[key]

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
    safetensors in ``stage`` (which the caller deletes), or inside `staged_sources` the
    staged copy."""
    directory, gguf_file = spec.resolve()
    if gguf_file is None and LazyWeights.is_checkpoint(directory):
        return LazyWeights(directory), ""
    if _STAGED:
        source = stage_source(spec, _STAGED[-1][0], say, model_config)
        return source, (f"source {spec.describe()} loaded whole once by transformers and "
                        f"re-saved as safetensors in {source.dir}; weights then read layer by "
                        f"layer{_staged_mark(source.dir).get('missing', '')}")
    say(f"{spec.describe()}: {_what(spec)} (whole model in memory) ...")
    missing = _resave(spec, model_config, stage)
    return LazyWeights(stage), (f"source {spec.describe()} loaded whole by transformers "
                                f"({_what(spec)}) and re-saved as safetensors; weights then "
                                f"read layer by layer{missing}")


def _what(spec) -> str:
    return "de-quantising the GGUF weights" if spec.resolve()[1] else "loading the weights"


def _resave(spec, model_config, directory: Path) -> str:
    """The model loaded whole and saved as safetensors with its tokenizer in ``directory``;
    "" or what is missing, for the report's note."""
    from . import models

    model = models.load_model(spec, models.resolve_dtype("auto", model_config, spec),
                              config=model_config)
    save_loaded(model, directory)
    del model
    try:  # the writers copy it into the output, as from a model directory
        models.load_tokenizer(spec).save_pretrained(directory)
    except CoalaError as exc:
        return f"; no tokenizer copied: {exc}"
    return ""


def save_loaded(model, directory: Path) -> None:
    """Save an in-memory model as a plain safetensors checkpoint (one file, or shards of at
    most `SHARD_BYTES` with their index).

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
            state[key] = tensor.detach()
    groups = split_by_size(list(state), lambda k: state[k].numel() * state[k].element_size())
    names = shard_names(len(groups))
    for name, group in zip(names, groups):  # one shard's copy at a time, not the model's
        save_safetensors({k: state[k].to("cpu").contiguous() for k in group}, directory / name)
    if len(names) > 1:
        write_index(directory, {k: name for name, group in zip(names, groups) for k in group},
                    sum(t.numel() * t.element_size() for t in state.values()))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    write_json(directory / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def split_by_size(keys: list[str], nbytes, limit: int | None = None) -> list[list[str]]:
    """``keys`` in order, cut into runs of at most ``limit`` bytes (default `SHARD_BYTES`; a
    larger tensor alone); ``[[]]`` for no keys, so an emptied shard is still one (empty) file."""
    limit = SHARD_BYTES if limit is None else limit
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        b = nbytes(key)
        if groups[-1] and size + b > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += b
    return groups


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """transformers' index of a sharded checkpoint: which file holds each tensor."""
    from .files import write_json

    write_json(Path(directory) / INDEX_FILE, {"metadata": {"total_size": total_size},
                                              "weight_map": dict(sorted(weight_map.items()))})


def shard_names(n: int) -> list[str]:
    """transformers' file names for a checkpoint of ``n`` shards."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


_STAGED: list[tuple[Path, object]] = []  # (directory, say) of the open `staged_sources` blocks
STAGED_MARK = "staged.json"


@contextmanager
def staged_sources(directory: str | os.PathLike, say=lambda msg: None):
    """Within this block a source without safetensors (GGUF, ``.bin``) is loaded whole and
    re-saved once, into ``directory``, and every stage that reads weights (`LazyWeights.find`:
    the block-by-block captures and gradient pass; `open_weights`: solve) reads that copy:
    compress de-quantised the embedded GGUF in each of its steps, and held the whole model in
    memory in each capture. The stores still record the source itself. ``say`` hears when the
    copy is made (minutes for a 1.5B GGUF)."""
    _STAGED.append((Path(directory), say))
    try:
        yield
    finally:
        _STAGED.pop()


def stage_source(spec, directory: Path, say=lambda msg: None, model_config=None) -> LazyWeights:
    """The staged safetensors copy of ``spec`` in ``directory``: made (whole or not at all:
    written aside, then renamed) unless it is there and was made from the same source files
    (their paths, sizes and modification times)."""
    from . import models
    from .files import write_json

    directory = Path(directory)
    made_from = {"source": spec.to_attrs(), "files": _identity(spec)}
    mark = _staged_mark(directory)
    if {k: mark.get(k) for k in made_from} == made_from:
        return LazyWeights(directory)
    say(f"{spec.describe()}: {_what(spec)} (whole model in memory, once) into {directory} ...")
    aside = directory.with_name(directory.name + ".partial")
    shutil.rmtree(aside, ignore_errors=True)
    config = model_config if model_config is not None else models.load_config(spec)
    missing = _resave(spec, config, aside)
    write_json(aside / STAGED_MARK, {**made_from, **({"missing": missing} if missing else {})})
    shutil.rmtree(directory, ignore_errors=True)
    aside.rename(directory)
    return LazyWeights(directory)


def _staged_mark(directory: Path) -> dict:
    try:
        mark = json.loads((Path(directory) / STAGED_MARK).read_text())
    except (OSError, ValueError):
        return {}
    return mark if isinstance(mark, dict) else {}


def _identity(spec) -> list:
    """(name, size, mtime_ns) of the source's files: a changed source is staged again."""
    d, gguf_file = spec.resolve()
    files = [d / gguf_file] if gguf_file else sorted(p for p in d.iterdir() if p.is_file())
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
