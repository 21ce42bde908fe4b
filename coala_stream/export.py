"""Writing solve's results as models, and loading them back.

Three output formats, looked up by name in `WRITERS`:

- ``factorized``: every compressed ``nn.Linear`` becomes a `LowRankLinear`
  (``B``: in -> rank, no bias; ``A``: rank -> out, with the original bias), so
  file size and parameter count really shrink. Saved as a Hugging Face
  directory (safetensors + config.json) whose config carries a
  ``coala_stream`` section (`SECTION`) with the rank of every factorized
  module; `load_model` rebuilds it (``from_config``, swap, load weights).
  Tensor keys: ``<module>.B.weight`` (r x n), ``<module>.A.weight`` (m x r),
  ``<module>.A.bias`` (m).
- ``dense``: ``W' = A @ B`` written in place of ``W``: an ordinary checkpoint
  that vanilla ``AutoModelForCausalLM.from_pretrained`` loads.
- ``peft``: ``DIR/base`` holds the residual ``W - A @ B`` as an ordinary
  checkpoint, ``DIR/adapter`` a LoRA adapter (PEFT's format: keys
  ``base_model.model.<module>.lora_A.weight`` = B (r x n) and ``...lora_B.weight``
  = A (m x r), ``lora_alpha = r`` so the scaling is 1). Before any training,
  base + adapter reproduces the original weights (to the rounding of the base
  dtype).

Writers stream: they are fed one source shard at a time (`ShardedCheckpoint`
reads the source lazily), so memory holds one shard plus one layer's factors.
Everything is written into a staging directory beside the target and published
by one rename (`staging_dir`); an existing target is refused unless
``overwrite``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .checkpoint import fsync_dir
from .errors import CoalaError, UsageError

SECTION = "coala_stream"  # the config.json key of our metadata
FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "solve_report.json"
# Small files of a model directory worth carrying over (tokenizer, generation defaults).
AUX_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
                       r"|merges\.txt|.*\.model|chat_template\..*|generation_config\.json|"
                       r"preprocessor_config\.json)$")


# -- the factorized module -------------------------------------------------------


class LowRankLinear(nn.Module):
    """``y = A(B(x))``: an (out x in) linear layer stored as rank-r factors.

    ``B``: nn.Linear(in, r, bias=False); ``A``: nn.Linear(r, out) with the
    original layer's bias. Parameters r (in + out) (+ out for the bias) instead
    of in x out. Cost per token 2 r (in + out) flops.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """An uninitialised LowRankLinear of the same shape, dtype and device as ``linear``."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                   device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_in_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named nn.Linear of ``model`` by a LowRankLinear of the given rank (in place)."""
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise CoalaError(f"factorized checkpoint names {name!r}, which is not an nn.Linear of "
                             f"the rebuilt {type(model).__name__} (found {type(old).__name__})")
        setattr(parent, child, LowRankLinear.from_linear(old, int(rank)))


# -- staging and publishing ---------------------------------------------------


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as a Path; UsageError if it exists and ``overwrite`` is off (checked before any work)."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UsageError(f"output {out} already exists; choose another --out or pass --overwrite "
                         f"to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory; remove it or choose another --out")
    return out


@contextmanager
def staging_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh directory beside ``out``; publish it as ``out`` by a rename on success.

    On any exception the staging directory is deleted and ``out`` is untouched.
    With ``overwrite``, an existing ``out`` is moved aside first and deleted
    after the new one is in place. Files are fsynced before the rename, so a
    published directory is complete.
    """
    out = check_out_dir(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    stage = out.parent / f".{out.name}.partial-{tag}"
    stage.mkdir()
    try:
        yield stage
        _fsync_tree(stage)
        old = None
        if out.exists():
            check_out_dir(out, overwrite)  # appeared meanwhile?
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        os.replace(stage, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# -- reading a source checkpoint lazily ------------------------------------------


class ShardedCheckpoint:
    """A Hugging Face safetensors checkpoint (one file or an index + shards), read lazily.

    Only the header of each shard is parsed up front; tensors are read on
    request (``get``) or a shard at a time (``read_shard``).
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.shards = sorted(set(weight_map.values()))
            self.sharded = True
        elif (self.dir / SINGLE_FILE).is_file():
            self.shards, self.sharded = [SINGLE_FILE], False
        else:
            raise CoalaError(f"{self.dir} holds no {SINGLE_FILE} or {INDEX_FILE}")
        self.shard_of: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for shard in self.shards:
            with safe_open(str(self.dir / shard), framework="pt") as f:
                for key in f.keys():
                    self.shard_of[key] = shard
                    self._shape[key] = tuple(f.get_slice(key).get_shape())

    @staticmethod
    def is_checkpoint(directory: Path) -> bool:
        return (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()

    def __contains__(self, key: str) -> bool:
        return key in self.shard_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape[key]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.dir / self.shard_of[key]), framework="pt") as f:
            return f.get_tensor(key)

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


def save_loaded(model, directory: Path) -> None:
    """Save an in-memory model as a plain single-file safetensors checkpoint.

    For sources transformers will not re-save (a de-quantised GGUF model is
    still flagged as quantized) or that are not safetensors. Tensors sharing
    storage (tied embeddings) are saved once, under their first name, as
    ``save_pretrained`` does; the config loses its ``quantization_config``.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    seen, state = set(), {}
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr not in seen:
            seen.add(ptr)
            state[key] = tensor.detach().to("cpu").contiguous()
    save_file(state, str(directory / SINGLE_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    write_json(directory / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


# -- writers -------------------------------------------------------------------


class _Writer:
    """Common part: same shard layout as the source, config.json with our section, aux files.

    Use: ``writer.write(layers, factor)`` then ``writer.finish(section)``.
    """

    format = ""
    weights_subdir = ""

    def __init__(self, out: Path, source: ShardedCheckpoint, final_dir: Path | None = None):
        self.out, self.source = Path(out), source
        self.final_dir = Path(final_dir if final_dir is not None else out)  # where out will be published
        self.weights_dir = self.out / self.weights_subdir if self.weights_subdir else self.out
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, layers: list[str], factor) -> None:
        """Stream the source shard by shard; ``factor(name, W) -> (A, B)`` for each listed
        layer (called in the order of ``layers`` within each shard), everything else copied.

        Memory: one source shard plus one layer's factors.
        """
        by_shard: dict[str, list[str]] = {}
        for name in layers:
            by_shard.setdefault(self.source.shard_of[f"{name}.weight"], []).append(name)
        skip = self.skip_keys(layers)
        for shard in self.source.shards:
            tensors = self.source.read_shard(shard, skip)
            for name in by_shard.get(shard, []):
                W = tensors[f"{name}.weight"]
                A, B = factor(name, W)
                self.write_layer(tensors, name, W, A, B)
            self.write_shard(shard, tensors)

    def skip_keys(self, layers: list[str]) -> set[str]:
        """Source keys not to copy verbatim (they move with their layer)."""
        return set()

    def write_layer(self, tensors: dict, name: str, W: torch.Tensor, A: torch.Tensor,
                    B: torch.Tensor) -> None:
        raise NotImplementedError

    def write_shard(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.weights_dir / shard), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = shard
            self.total_size += v.numel() * v.element_size()

    def finish(self, section: dict) -> None:
        if self.source.sharded:
            write_json(self.weights_dir / INDEX_FILE,
                       {"metadata": {"total_size": self.total_size},
                        "weight_map": dict(sorted(self.weight_map.items()))})
        config = self.source.config()
        config[SECTION] = {"format": self.format, "format_version": FORMAT_VERSION,
                           "tool_version": __version__, **section}
        write_json(self.weights_dir / "config.json", config)
        self.source.copy_aux_files(self.weights_dir)


class DenseWriter(_Writer):
    """W' = A @ B in place of W: loads with vanilla transformers."""

    format = "dense"

    def write_layer(self, tensors, name, W, A, B):
        tensors[f"{name}.weight"] = (A @ B).to(W.dtype)


class FactorizedWriter(_Writer):
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


class PeftWriter(_Writer):
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
        from safetensors.torch import save_file

        super().finish({**section, "ranks": self.ranks})
        adapter_dir = self.out / "adapter"
        adapter_dir.mkdir()
        save_file(self.adapter, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
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


# -- loading outputs back -------------------------------------------------------


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


def load_model(path: str | os.PathLike, dtype=None, device="cpu"):
    """Load any solve output (factorized, dense, peft) or a Hugging Face model directory.

    Factorized: ``from_config`` (no weight init), each module listed in the
    config's ``coala_stream.ranks`` swapped for a `LowRankLinear`, weights
    loaded strictly (only tied weights such as lm_head may be absent; they are
    re-tied). Peft: the base model wrapped by ``peft.PeftModel.from_pretrained``.
    ``dtype``: None/"auto" keeps the saved dtype. Returns the model in eval mode.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    kind = detect_format(path)
    if kind is None:
        raise CoalaError(f"{path} is not a model directory (no config.json, and not a peft output "
                         f"with base/ and adapter/)")
    if kind == "factorized":
        model = _load_factorized(path, dtype)
    elif kind == "peft":
        model = _load_peft(path, dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     dtype=_torch_dtype(dtype, config))
    model.eval()
    return model.to(device)


def build_model(config, dtype: torch.dtype | None = None):
    """An untrained model of ``config.architectures[0]`` (so module names match what capture
    saw), else an AutoModelForCausalLM. Call under ``torch.device("meta")`` for a skeleton."""
    import transformers

    kwargs = {} if dtype is None else {"dtype": dtype}
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls._from_config(config, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def _load_factorized(path: Path, dtype):
    from transformers import AutoConfig

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    ranks = getattr(config, SECTION)["ranks"]
    torch_dtype = _torch_dtype(dtype, config)
    with no_init_weights():
        model = build_model(config, torch_dtype)
    swap_in_low_rank(model, ranks)
    source = ShardedCheckpoint(path)
    unexpected = []
    for shard in source.shards:
        tensors = {k: v.to(torch_dtype) for k, v in source.read_shard(shard).items()}
        result = model.load_state_dict(tensors, strict=False)
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
    base = load_model(path / "base", dtype=dtype)
    return PeftModel.from_pretrained(base, str(path / "adapter"))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a solve output (``base/`` for peft) or in an HF directory."""
    from transformers import AutoTokenizer

    path = Path(path)
    if detect_format(path) == "peft":
        path = path / "base"
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CoalaError(f"cannot load a tokenizer from {path}: {exc}") from exc
