"""Calibration text -> token windows.

Sources:

- ``builtin``: CPython's pydoc topics (``pydoc_data.topics``), about 465k
  characters of real English prose and code from the Python documentation,
  shipped with every Python, so no download is needed. The topics are split
  once, deterministically, into a calibration part (``builtin``, about 80%)
  and a disjoint held-out part (``builtin:heldout``, about 20%) so that
  calibrating on one and evaluating on the other never overlaps;
  ``builtin:all`` is the whole text. It is Python documentation, not
  Wikipedia: for results comparable with papers (SVD-LLM, COALA use
  WikiText-2) pass a WikiText-2 file. Its text, and so its hash, can change
  between Python versions; the hash is recorded in the store.
- ``PATH``: a UTF-8 text file (e.g. WikiText-2's ``wiki.train.raw``).
- records: a ``.jsonl``, ``.parquet`` or ``.arrow`` file, a directory written
  by ``datasets.Dataset.save_to_disk`` or a directory of ``.jsonl`` /
  ``.parquet`` files (layouts and checks in `calib_formats`). Each record's
  ``--text-field`` is read, or with ``--chat-template`` its ``messages``
  rendered by the tokenizer's chat template; the texts are joined by a blank
  line. `read_data` reads and checks all of it before any tokenizer loads.

The text is tokenized once, without special tokens, and ``samples`` windows of
``seq_len`` tokens are drawn at random, non-overlapping positions
(deterministic for a seed; same protocol as GPTQ / SVD-LLM calibration except
that windows never overlap). `shard_calibration` cuts that draw into
contiguous parts for ``capture --shard I/N``.

BOS (``--bos``, `bos_token`): a model whose tokenizer starts every text with a
BOS token (Gemma, Llama 3, Mistral) is used with one, so its windows get one
too. A window is then ``[BOS] + seq_len - 1`` text tokens: the model sees
``seq_len`` tokens either way (same positions, memory and chunk arithmetic),
and the BOS position's activations are captured like any other, because the
model computes them in use. Without BOS a window is ``seq_len`` text tokens.
`evaluate` cuts its windows the same way (`with_bos`), so in both layouts
``seq_len - 1`` tokens per window are predicted and counted: with BOS every
text token of the window, without it all but the first.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import calib_formats
from .errors import CoalaError, UsageError

BUILTIN = "builtin"
BUILTIN_HELDOUT = "builtin:heldout"
BUILTIN_ALL = "builtin:all"
BUILTIN_NAMES = (BUILTIN, BUILTIN_HELDOUT, BUILTIN_ALL)
HELDOUT_FRACTION = 0.2
RECORD_SEPARATOR = "\n\n"  # between records' texts, as between builtin topics
BOS_MODES = ("auto", "always", "never")


@dataclass
class Calibration:
    """Token windows for calibration, and what a store must record about them.

    ids: (n x seq_len) int64 token ids; row ``i`` is sample ``sample_range[0] + i``.
    starts: token offset of each window in the tokenized text.
    source: human-readable description of the data.
    sha256: of the data as read, before any chat template (`Source.sha256`).
    tokens_sha256: of all the draw's windows (little-endian int64), so it covers the
        tokenizer and chat template too and is the same for every shard of one draw.
    text_tokens: length of the tokenized text.
    format: "text", "jsonl", "parquet", "arrow" or "builtin".
    field: the record field read ("messages" with a chat template), None for plain text.
    chat_template: whether the tokenizer's chat template rendered the records.
    shard: (index, count) of a part made by `shard_calibration`, None for the whole draw.
    sample_range: (start, stop) of these windows among all the draw's samples.
    shard_tokens_sha256: of ``ids`` alone; equals tokens_sha256 for the whole draw.
    bos_token_id: the token that starts each window (column 0 of ``ids``), None for none.
    """

    ids: torch.Tensor
    starts: list[int]
    source: str
    sha256: str
    tokens_sha256: str
    text_tokens: int
    format: str = "text"
    field: str | None = None
    chat_template: bool = False
    shard: tuple[int, int] | None = None
    sample_range: tuple[int, int] | None = None
    shard_tokens_sha256: str = ""
    bos_token_id: int | None = None

    def attrs(self) -> dict:
        """What a store keeps about its calibration, in JSON types (lists, not tuples,
        so a copy read back from the store compares equal)."""
        return {"source": self.source, "sha256": self.sha256, "format": self.format,
                "field": self.field, "chat_template": self.chat_template,
                "tokens_sha256": self.tokens_sha256, "text_tokens": self.text_tokens,
                "shard": None if self.shard is None else list(self.shard),
                "sample_range": None if self.sample_range is None else list(self.sample_range),
                "shard_tokens_sha256": self.shard_tokens_sha256,
                "bos_token_id": self.bos_token_id}


@dataclass(frozen=True)
class Source:
    """Calibration data read and checked by `read_data`, before any tokenizer is loaded.

    source, format, field: as in `Calibration`.
    sha256: of ``text``'s UTF-8 bytes; with a chat template, of the messages as
        canonical JSON, one record per line.
    text: the records' texts joined by a blank line (a text file's or builtin's
        whole text); None with a chat template.
    messages: with a chat template, one checked list of {role, content} per record.
    where: with a chat template, each record's file and line or row, for errors.
    """

    source: str
    format: str
    field: str | None
    sha256: str
    text: str | None = None
    messages: list | None = None
    where: tuple[str, ...] = ()

    @property
    def chat_template(self) -> bool:
        return self.messages is not None

    def render(self, tokenizer) -> str:
        """The text to tokenize: ``text``, or each record through the chat template, joined."""
        if not self.chat_template:
            return self.text
        if not getattr(tokenizer, "chat_template", None):
            raise CoalaError(f"--chat-template: this model's tokenizer has no chat template; "
                             f"drop --chat-template (and pass --text-field) to calibrate on "
                             f"plain text from {self.source}")
        texts = []
        for messages, where in zip(self.messages, self.where):
            try:
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            except Exception as exc:  # jinja templates raise anything, e.g. on a role order
                raise CoalaError(f"{where}: the chat template rejects these messages ({exc}); "
                                 f"fix or remove the record") from exc
        return RECORD_SEPARATOR.join(texts)


def builtin_text(part: str = BUILTIN_ALL) -> str:
    """CPython's pydoc topics in sorted key order: all of them, or one part of the split.

    A topic goes to the held-out part whenever that part holds less than
    ``HELDOUT_FRACTION`` of the characters seen so far, which interleaves the
    two parts through the alphabet instead of holding out one end of it.
    """
    from pydoc_data.topics import topics

    if part not in BUILTIN_NAMES:
        raise UsageError(f"unknown builtin text {part!r}; choose one of {', '.join(BUILTIN_NAMES)}")
    seen = held = 0
    chosen = []
    for key in sorted(topics):
        text = topics[key]
        seen += len(text)
        heldout = held < HELDOUT_FRACTION * seen
        if heldout:
            held += len(text)
        if part == BUILTIN_ALL or heldout == (part == BUILTIN_HELDOUT):
            chosen.append(text)
    return "\n\n".join(chosen)


def read_data(data: str, text_field: str = "text", chat_template: bool = False) -> Source:
    """Read and check ``--data``: ``builtin``, ``builtin:heldout``, ``builtin:all``, a
    ``.jsonl`` / ``.parquet`` / ``.arrow`` file, a dataset directory or a text file.

    Needs no tokenizer, so bad data fails before a model loads. Records give
    their ``text_field``, or with ``chat_template`` their ``messages`` (checked
    here, rendered by `Source.render`). Every problem is one CoalaError line
    (UsageError for a bad argument) naming the file, line or row, and the fix.
    """
    if data in BUILTIN_NAMES:
        _plain_only(data, text_field, chat_template)
        return _text_source(builtin_text(data), _builtin_description(data), "builtin")
    path = Path(data).expanduser()
    if path.is_dir() or path.suffix.lower() in calib_formats.SUFFIXES:
        return _read_records(path, text_field, chat_template)
    _plain_only(data, text_field, chat_template)
    return _text_source(_read_text_file(path), str(path.resolve()), "text")


def load_text(data: str) -> tuple[str, str]:
    """(text, source description) of any ``--data``, records joined, no chat template;
    CoalaError if unusable."""
    src = read_data(data)
    return src.text, src.source


def _builtin_description(data: str) -> str:
    import sys

    v = sys.version_info
    part = {BUILTIN: "calibration part", BUILTIN_HELDOUT: "held-out part", BUILTIN_ALL: "all"}[data]
    return f"{data}: CPython {v.major}.{v.minor} pydoc topics (Python documentation), {part}"


def _plain_only(data: str, text_field: str, chat_template: bool) -> None:
    """UsageError for a records-only option given with plain text, which would ignore it."""
    records = "(a .jsonl, .parquet or .arrow file or a dataset directory)"
    if chat_template:
        raise UsageError(f"--chat-template needs records with a 'messages' field {records}; "
                         f"{data} is plain text")
    if text_field != "text":
        raise UsageError(f"--text-field {text_field} names a field of records {records}; "
                         f"{data} is plain text, so drop --text-field")


def _read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CoalaError(f"cannot read calibration text {path}: {exc.strerror or exc} (--data "
                         f"takes 'builtin', 'builtin:heldout', 'builtin:all', a UTF-8 text file, "
                         f"a .jsonl, .parquet or .arrow file, or a dataset directory)") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CoalaError(f"calibration text {path} is not UTF-8 (byte {exc.start}: {exc.reason});"
                         f" convert it, e.g. iconv -t UTF-8") from exc


def _text_source(text: str, source: str, fmt: str, field: str | None = None) -> Source:
    if not text.strip():
        raise CoalaError(f"calibration text {source} is empty")
    return Source(source, fmt, field, hashlib.sha256(text.encode("utf-8")).hexdigest(), text=text)


def _read_records(path: Path, text_field: str, chat: bool) -> Source:
    """A Source from a records file or directory (see calib_formats)."""
    if not chat and not text_field:
        raise UsageError("--text-field must name the field that holds the text, got ''")
    rec = calib_formats.Records("messages" if chat else text_field, chat)
    fmt, what = _read_into(path, rec)
    if not rec.seen:
        raise CoalaError(f"calibration data {path} holds no records; pass a file with at least "
                         f"one record (or a text file, or builtin)")
    if not rec.values:
        raise CoalaError(f"calibration data {path}: all {rec.seen} records have an empty "
                         f"{rec.field!r}; pass --text-field naming the field that holds the text")
    skipped = f", {rec.skipped} empty skipped" if rec.skipped else ""
    source = f"{path.resolve()} ({what}: {rec.seen} records{skipped}, field {rec.field!r})"
    if not chat:
        return _text_source(RECORD_SEPARATOR.join(rec.values), source, fmt, text_field)
    canonical = "\n".join(json.dumps(m, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
                          for m in rec.values)
    return Source(source, fmt, "messages", hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
                  messages=rec.values, where=tuple(rec.where))


def _read_into(path: Path, rec: calib_formats.Records) -> tuple[str, str]:
    """Feed every record under ``path`` to ``rec``; (format, description of the layout)."""
    if not path.is_dir():
        fmt = calib_formats.SUFFIXES[path.suffix.lower()]
        calib_formats.READERS[fmt](path, rec)
        return fmt, f"{fmt} file"
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise CoalaError(f"{path} is a saved DatasetDict (splits: {', '.join(splits) or 'none'});"
                         f" pass one split's directory, e.g. --data {path / 'train'}")
    if (path / "state.json").is_file():
        files = calib_formats.read_saved_dataset(path, rec)
        return "arrow", f"datasets save_to_disk directory, {len(files)} Arrow file(s)"
    files, note = calib_formats.data_files(path)
    fmt = calib_formats.SUFFIXES[files[0].suffix]
    for f in files:
        calib_formats.READERS[fmt](f, rec)
    return fmt, f"directory of {len(files)} {fmt} file(s){note}"


def check_seq_len(seq_len: int, max_len: int | None) -> None:
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if max_len is not None and seq_len > max_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's maximum of {max_len} positions")


def window_starts(total: int, samples: int, seq_len: int, seed: int) -> list[int]:
    """``samples`` random, non-overlapping window offsets in ``[0, total - seq_len]``.

    Draws the ``total - samples*seq_len`` spare tokens as sorted gaps, so every
    placement is possible, then shuffles the order of the windows. Uses a
    private ``torch.Generator`` (Mersenne Twister), so the result depends only
    on the arguments.
    """
    spare = total - samples * seq_len
    assert spare >= 0
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(0, spare + 1, (samples,), generator=g).sort().values
    order = torch.randperm(samples, generator=g)
    starts = gaps + torch.arange(samples) * seq_len
    return starts[order].tolist()


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` called with its defaults starts a text with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", return_attention_mask=False, verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, return_attention_mask=False,
                      verbose=False)["input_ids"]
    return bool(ids) and ids[0] == bos and plain[:1] != [bos]


def bos_token(tokenizer, mode: str) -> int | None:
    """The token id that starts each window for ``--bos mode``, None for none.

    auto: the BOS token when the tokenizer adds one by default (see `adds_bos`);
    always: the BOS token (UsageError if the tokenizer has none); never: None.
    """
    check_bos_mode(mode)
    if mode == "never" or (mode == "auto" and not adds_bos(tokenizer)):
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise UsageError("--bos always: this model's tokenizer has no BOS token; use --bos auto "
                         "or --bos never")
    return int(bos)


def check_bos_mode(mode: str) -> None:
    if mode not in BOS_MODES:
        raise UsageError(f"--bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")


def text_per_window(seq_len: int, bos: int | None) -> int:
    """Text tokens in a window of ``seq_len`` model tokens: one fewer with a BOS in front."""
    return seq_len - (bos is not None)


def with_bos(text_windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(n x L) text windows -> (n x L + 1) with ``bos`` in column 0; unchanged for None."""
    if bos is None:
        return text_windows
    first = torch.full((text_windows.shape[0], 1), bos, dtype=text_windows.dtype)
    return torch.cat([first, text_windows], dim=1)


def calibration_windows(tokenizer, data: str | Source, samples: int, seq_len: int, seed: int = 0,
                        max_len: int | None = None, *, text_field: str = "text",
                        chat_template: bool = False, bos: int | None = None) -> Calibration:
    """Tokenize ``data`` and draw the windows; see module docstring.

    ``data`` is a ``--data`` string, read with `read_data` (``text_field``,
    ``chat_template``), or a `Source` already read, whose own field and chat
    template setting then apply. ``bos`` (from `bos_token`) starts each window:
    ``[bos] + seq_len - 1`` text tokens, so every window is still ``seq_len`` long.
    """
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    check_seq_len(seq_len, max_len)
    src = data if isinstance(data, Source) else read_data(data, text_field, chat_template)
    ids = tokenizer(src.render(tokenizer), add_special_tokens=False,
                    return_attention_mask=False, verbose=False)["input_ids"]
    total, span = len(ids), text_per_window(seq_len, bos)
    if total < samples * span:
        fit = total // span
        what = f"{span} text tokens (--seq-len {seq_len} less the BOS)" if bos is not None \
            else f"{seq_len} tokens"
        raise CoalaError(
            f"calibration text {src.source} is too short: {total} tokens, but {samples} samples x "
            f"{what} need {samples * span}; at most {fit} samples fit (use --samples {fit} or a "
            f"shorter --seq-len, or a longer text)"
            if fit else
            f"calibration text {src.source} is too short: {total} tokens, fewer than one window "
            f"of {what}; use a longer text or a shorter --seq-len")
    all_ids = torch.tensor(ids, dtype=torch.int64)
    starts = window_starts(total, samples, span, seed)
    windows = with_bos(torch.stack([all_ids[s:s + span] for s in starts]), bos)
    digest = _tokens_sha256(windows)
    return Calibration(ids=windows, starts=starts, source=src.source, sha256=src.sha256,
                       tokens_sha256=digest, text_tokens=total, format=src.format,
                       field=src.field, chat_template=src.chat_template,
                       sample_range=(0, samples), shard_tokens_sha256=digest, bos_token_id=bos)


def _tokens_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().astype("<i8").tobytes()).hexdigest()


# ---------------------------------------------------------------------------
# Shards: N nodes capture disjoint parts of one draw

def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N; UsageError naming ``--shard`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    how = "--shard takes I/N, part I of N counting from 0, e.g. --shard 0/4 for the first of 4"
    if not m:
        raise UsageError(f"{how}; got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1:
        raise UsageError(f"{how}; got {text!r}, and N must be at least 1")
    if index >= count:
        raise UsageError(f"{how}; got {text!r}, but I must be below N: the parts of {count} "
                         f"are 0/{count} to {count - 1}/{count}")
    return index, count


def shard_calibration(cal: Calibration, index: int, count: int) -> Calibration:
    """Part ``index`` of ``count`` of the whole draw ``cal``: samples [I*S//N, (I+1)*S//N).

    The parts are contiguous, so concatenated in index order they are the
    unsharded samples in order; ``tokens_sha256`` stays the hash of the whole
    draw, so a store of each part shows they belong together.
    """
    if cal.shard is not None:
        raise ValueError("shard_calibration takes the whole draw, not a shard of it")
    if not 0 <= index < count:
        raise UsageError(f"--shard {index}/{count}: I must satisfy 0 <= I < N, e.g. --shard 0/4")
    total = cal.ids.shape[0]
    if count > total:
        raise UsageError(f"--shard {index}/{count} splits --samples {total} into {count} parts, "
                         f"so some would get no samples; use at most {total} parts or raise "
                         f"--samples to at least {count}")
    start, stop = index * total // count, (index + 1) * total // count
    ids = cal.ids[start:stop].clone()  # not a view, so the whole draw can be freed
    return replace(cal, ids=ids, starts=cal.starts[start:stop], shard=(index, count),
                   sample_range=(start, stop), shard_tokens_sha256=_tokens_sha256(ids))
