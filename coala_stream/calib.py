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

The text is tokenized once, without special tokens, and ``samples`` windows of
``seq_len`` tokens are drawn at random, non-overlapping positions
(deterministic for a seed; same protocol as GPTQ / SVD-LLM calibration except
that windows never overlap).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CoalaError, UsageError

BUILTIN = "builtin"
BUILTIN_HELDOUT = "builtin:heldout"
BUILTIN_ALL = "builtin:all"
BUILTIN_NAMES = (BUILTIN, BUILTIN_HELDOUT, BUILTIN_ALL)
HELDOUT_FRACTION = 0.2


@dataclass
class Calibration:
    """Token windows for calibration.

    ids: (samples x seq_len) int64 token ids, window ``i`` is sample ``i``.
    starts: token offset of each window in the tokenized text.
    source: human-readable description of the text.
    sha256: of the text's UTF-8 bytes.
    tokens_sha256: of ``ids`` (little-endian int64), covers the tokenizer too.
    text_tokens: length of the tokenized text.
    """

    ids: torch.Tensor
    starts: list[int]
    source: str
    sha256: str
    tokens_sha256: str
    text_tokens: int


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


def load_text(data: str) -> tuple[str, str]:
    """(text, source description) for ``builtin`` or a file path; CoalaError if unusable."""
    if data in BUILTIN_NAMES:
        import sys

        v = sys.version_info
        part = {BUILTIN: "calibration part", BUILTIN_HELDOUT: "held-out part", BUILTIN_ALL: "all"}[data]
        return builtin_text(data), (f"{data}: CPython {v.major}.{v.minor} pydoc topics "
                                    f"(Python documentation), {part}")
    path = Path(data).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CoalaError(f"cannot read calibration text {path}: {exc.strerror or exc}"
                         f" (--data takes 'builtin', 'builtin:heldout', 'builtin:all' or a UTF-8 text file)") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CoalaError(f"calibration text {path} is not UTF-8 (byte {exc.start}: {exc.reason});"
                         f" convert it, e.g. iconv -t UTF-8") from exc
    return text, str(path.resolve())


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


def calibration_windows(tokenizer, data: str, samples: int, seq_len: int, seed: int = 0,
                        max_len: int | None = None) -> Calibration:
    """Tokenize ``data`` (``builtin`` or a path) and draw the windows; see module docstring."""
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    check_seq_len(seq_len, max_len)
    text, source = load_text(data)
    if not text.strip():
        raise CoalaError(f"calibration text {source} is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    total = len(ids)
    if total < samples * seq_len:
        fit = total // seq_len
        raise CoalaError(
            f"calibration text {source} is too short: {total} tokens, but {samples} samples x "
            f"{seq_len} tokens need {samples * seq_len}; at most {fit} samples of {seq_len} "
            f"tokens fit (use --samples {fit} or a shorter --seq-len, or a longer text)"
            if fit else
            f"calibration text {source} is too short: {total} tokens, fewer than one window of "
            f"--seq-len {seq_len}; use a longer text or a shorter --seq-len")
    all_ids = torch.tensor(ids, dtype=torch.int64)
    starts = window_starts(total, samples, seq_len, seed)
    windows = torch.stack([all_ids[s:s + seq_len] for s in starts])
    return Calibration(
        ids=windows,
        starts=starts,
        source=source,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        tokens_sha256=hashlib.sha256(windows.numpy().astype("<i8").tobytes()).hexdigest(),
        text_tokens=total,
    )
