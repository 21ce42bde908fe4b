"""Perplexity by the protocol compression papers use (GPTQ, SVD-LLM).

The text is taken as one string, tokenized once (no special tokens), cut into
non-overlapping windows of ``seq_len`` tokens (a trailing partial window is
dropped), each window run on its own (no context carried over), and the
perplexity is ``exp`` of the mean negative log-likelihood over all predicted
tokens (``seq_len - 1`` per window). GPTQ / SVD-LLM weight each window by
``seq_len`` instead of ``seq_len - 1``; with equal-length windows both give the
same mean.

BOS (``--bos``, as capture's, `calib.bos_token`): for a model whose tokenizer
starts every text with a BOS token (Gemma, Llama 3), each window is ``[BOS] +
seq_len - 1`` text tokens, the text cut every ``seq_len - 1`` tokens; every text
token is predicted (the first one from the BOS alone), so again ``seq_len - 1``
per window. For a tokenizer that adds none (SmolLM2, Qwen2.5) ``auto`` is the
plain protocol above, figure for figure.

Text: for a file, its contents with line endings normalised to ``\\n`` (CRLF ->
LF, as Python's text mode reads it), *not* GPTQ's ``"\\n\\n".join`` of the
dataset's rows: the shared ``wiki.test.raw`` holds only the non-empty rows, so
that join could not be reproduced exactly anyway; the difference is whitespace
only. ``builtin:heldout`` (the default) is the part of CPython's pydoc topics that
calibration on ``builtin`` never sees (`calib.builtin_text`).

Models: a Hugging Face directory, a GGUF file, the embedded default (no
MODEL), or a ``solve`` output (factorized, dense or peft, detected from the
directory by `export.detect_format`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import calib, export, models
from .devices import THREADS_RULE, resolve_device, torch_threads
from .errors import CoalaError, UsageError
from .progress import bar as progress_bar


@dataclass
class EvalConfig:
    """Settings of one evaluation; each field's help is also its CLI help."""

    model: str | None = field(default=None, metadata={
        "help": "a Hugging Face model directory, a .gguf file, or a solve output (factorized, "
                "dense or peft, detected); default: the embedded SmolLM2-135M-Instruct",
        "positional": True, "metavar": "MODEL_OR_DIR"})
    gguf_file: str | None = field(default=None, metadata={
        "help": "name of the GGUF file inside MODEL (when MODEL is a directory holding one)",
        "metavar": "NAME"})
    data: str = field(default=calib.BUILTIN_HELDOUT, metadata={
        "help": "evaluation text: 'builtin:heldout' (the part of CPython's pydoc topics that "
                "calibration's 'builtin' never uses), 'builtin', 'builtin:all', or a UTF-8 text "
                "file, e.g. wiki.test.raw; used whole, line endings normalised to \\n",
        "metavar": "builtin:heldout|PATH"})
    seq_len: int = field(default=512, metadata={"help": "tokens per window", "metavar": "N"})
    max_windows: int | None = field(default=None, metadata={
        "help": "evaluate only the first N windows (default: all that fit in the text)",
        "metavar": "N"})
    batch_size: int = field(default=1, metadata={"help": "windows per forward pass",
                                                 "metavar": "N"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    threads: int | None = field(default=None, metadata={
        "help": f"torch CPU threads; {THREADS_RULE}", "metavar": "N"})
    dtype: str = field(default="auto", metadata={
        "help": "auto: the saved dtype (GGUF loads as float32)",
        "choices": ("auto", *models.DTYPES)})
    bos: str = field(default="auto", metadata={
        "help": "start each window with the tokenizer's BOS token ([BOS] + --seq-len - 1 text "
                "tokens, every text token predicted): auto when the tokenizer adds one by default "
                "(Gemma, Llama 3; SmolLM2's and Qwen2.5's do not, so their windows stay plain "
                "text), always, or never", "choices": calib.BOS_MODES})


@dataclass
class PerplexityResult:
    """One perplexity figure and everything needed to reproduce it."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seq_len: int
    predicted_tokens: int
    text_tokens: int
    data: str  # where the text came from
    model: str
    model_format: str  # hf, gguf, embedded, factorized, dense, peft
    dtype: str
    device: str
    seconds: float
    threads: int  # torch CPU threads it ran on
    bos_token_id: int | None = None  # the token that started each window, None for none

    def line(self) -> str:
        name = self.data.split(": ", 1)[0] + " text" if self.data.startswith("builtin") \
            else Path(self.data).name
        bos = "" if self.bos_token_id is None else " (BOS + text)"
        return (f"ppl {self.ppl:.2f} on {self.windows} windows x {self.seq_len} tokens{bos} of "
                f"{name} "
                f"(model {self.model}, {self.model_format}, {self.dtype}, {self.seconds:.1f} s, "
                f"{self.threads} torch thread{'' if self.threads == 1 else 's'})")

    def to_dict(self) -> dict:
        return asdict(self)


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, without special tokens: a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
               device="cpu", batch_size: int = 1, progress: bool = False,
               bos: int | None = None) -> tuple[float, int, int]:
    """Sum of token NLLs over non-overlapping windows of ``ids``: (nll_sum, predicted, windows).

    Without ``bos`` window i is ``ids[i*L:(i+1)*L]`` (L = seq_len), its first token
    context only; with it, ``[bos] + ids[i*(L-1):(i+1)*(L-1)]``, every text token
    predicted. Logits are upcast to float32 for the log-softmax.
    """
    span = calib.text_per_window(seq_len, bos)
    windows = ids.numel() // span
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise CoalaError(f"the text has {ids.numel()} tokens, fewer than one window of "
                         f"--seq-len {seq_len}; use a longer text or a shorter --seq-len")
    text = ids[: windows * span].view(windows, span)
    batches = calib.with_bos(text, bos).split(batch_size)
    total = 0.0
    with progress_bar(windows, "eval", "window", enabled=progress) as bar:
        for batch in batches:
            batch = batch.to(device)
            total += nll_sum(model(input_ids=batch).logits, batch)
            bar.update(batch.shape[0])
    return total, windows * (seq_len - 1), windows


def nll_sum(logits: torch.Tensor, ids: torch.Tensor, block: int = 512) -> float:
    """Summed NLL of ``ids[:, 1:]`` under ``logits[:, :-1]``, ``block`` positions at a time,
    each upcast to float32 on its own: a 2048-token window over Qwen's 152k-token vocabulary
    is 1.2 GB of float32 logits, and a log-softmax of all of them would be as much again."""
    total, predicted = 0.0, ids.shape[1] - 1
    for s in range(0, predicted, block):
        e = min(s + block, predicted)
        part = logits[:, s:e].float()
        total += float(torch.nn.functional.cross_entropy(
            part.reshape(-1, part.shape[-1]), ids[:, s + 1:e + 1].reshape(-1), reduction="sum"))
    return total


def perplexity(model, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None,
               device="cpu", batch_size: int = 1, progress: bool = False,
               bos: str = "auto") -> dict:
    """ppl, nll, windows, predicted_tokens, text_tokens, bos_token_id of ``model`` on
    ``text`` (see module doc); ``bos`` is a `calib.BOS_MODES` word."""
    bos_id = calib.bos_token(tokenizer, bos)
    ids = token_ids(tokenizer, normalise_newlines(text))
    nll_sum, predicted, windows = window_nll(model, ids, seq_len, max_windows, device,
                                             batch_size, progress, bos_id)
    nll = nll_sum / predicted
    return {"ppl": math.exp(nll), "nll": nll, "windows": windows,
            "predicted_tokens": predicted, "text_tokens": ids.numel(), "bos_token_id": bos_id}


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_for_eval(model: str | None, gguf_file: str | None = None, dtype: str = "auto"):
    """(model, tokenizer, description, format) for a path, a GGUF file or the embedded default."""
    path = None if model is None else Path(model).expanduser()
    kind = export.detect_format(path) if path is not None and path.is_dir() else None
    if kind in ("factorized", "dense", "peft"):
        net = export.load_output(path, dtype=None if dtype == "auto" else dtype)
        return net, export.load_tokenizer(path), str(path), kind
    spec = models.ModelSpec.from_args(model, gguf_file)
    config = models.load_config(spec)
    net = models.load_model(spec, models.resolve_dtype(dtype, config, spec), config=config)
    fmt = "embedded" if spec.embedded else ("gguf" if spec.gguf_file else "hf")
    return net, models.load_tokenizer(spec), spec.describe(), fmt


def evaluate(config: EvalConfig | None = None, progress: bool = True, **overrides) -> PerplexityResult:
    """Load the model named by ``config`` and measure its perplexity on ``config.data``."""
    config = config or EvalConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    _validate(config)
    t0 = time.perf_counter()
    text, source = calib.load_text(config.data)  # bad data fails before the model loads
    device = resolve_device(config.device)
    with torch_threads(config.threads):
        net, tokenizer, name, fmt = load_for_eval(config.model, config.gguf_file, config.dtype)
        calib.check_seq_len(config.seq_len, models.max_positions(net.config))
        net.to(device)
        res = perplexity(net, tokenizer, text, config.seq_len, config.max_windows, device,
                         config.batch_size, progress, config.bos)
        threads = torch.get_num_threads()
    dtype = str(next(net.parameters()).dtype).removeprefix("torch.")
    return PerplexityResult(data=source, model=name, model_format=fmt, seq_len=config.seq_len,
                            dtype=dtype, device=str(device), threads=threads,
                            seconds=time.perf_counter() - t0, **res)


def _validate(config: EvalConfig) -> None:
    if config.max_windows is not None and config.max_windows < 1:
        raise UsageError(f"--max-windows must be at least 1, got {config.max_windows}")
    if config.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {config.batch_size}")
    calib.check_bos_mode(config.bos)
    if config.dtype != "auto" and config.dtype not in models.DTYPES:
        raise UsageError(f"--dtype must be auto or one of {', '.join(models.DTYPES)}, "
                         f"got {config.dtype!r}")
    check_model_path(config.model)


def check_model_path(model: str | None) -> None:
    """CoalaError for a MODEL that is not there (None: the embedded default), before loading."""
    if model is not None and not Path(model).expanduser().exists():
        hint = models.hub_hint(model)
        raise CoalaError(f"model not found: {model} is not a local path; {hint}" if hint
                         else f"model not found: {model} does not exist (give a model "
                              f"directory, a .gguf file, a solve output, or omit MODEL for the "
                              f"embedded SmolLM2)")


