"""Calibration windows: deterministic, non-overlapping, inside the text; clear errors."""

from __future__ import annotations

import pytest
import torch

from coala_stream import calib
from coala_stream.errors import CoalaError, UsageError


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("total,samples,seq_len", [
    (100, 10, 10),     # no spare token: the windows tile the text
    (1000, 7, 33),     # plenty of room
    (64, 1, 64),       # one window, exactly the text
    (500, 20, 2),      # shortest allowed window
])
@pytest.mark.parametrize("seed", [0, 1])
def test_window_starts_are_disjoint_and_inside(total, samples, seq_len, seed):
    starts = calib.window_starts(total, samples, seq_len, seed)
    assert len(starts) == samples
    spans = sorted(starts)
    assert spans[0] >= 0 and spans[-1] + seq_len <= total
    assert all(b - a >= seq_len for a, b in zip(spans, spans[1:]))
    assert starts == calib.window_starts(total, samples, seq_len, seed)  # deterministic


def test_window_starts_depend_on_seed_and_are_not_sorted():
    a = calib.window_starts(10_000, 16, 64, 0)
    assert a != calib.window_starts(10_000, 16, 64, 1)
    assert a != sorted(a)  # sample order is shuffled, not text order


def test_builtin_windows_are_slices_of_the_tokenized_text(tokenizer):
    c = calib.calibration_windows(tokenizer, "builtin", 4, 32, seed=3)
    assert c.ids.shape == (4, 32) and c.ids.dtype == torch.int64
    assert "pydoc" in c.source and len(c.sha256) == 64 and c.text_tokens > 100_000
    text_ids = tokenizer(calib.builtin_text("builtin"), add_special_tokens=False)["input_ids"]
    for row, s in zip(c.ids.tolist(), c.starts):
        assert row == text_ids[s:s + 32]


def test_file_source_is_deterministic(tokenizer, tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(calib.builtin_text()[:20_000], encoding="utf-8")
    c = calib.calibration_windows(tokenizer, str(p), 3, 16, seed=0)
    assert c.source == str(p.resolve()) and c.ids.shape == (3, 16)
    again = calib.calibration_windows(tokenizer, str(p), 3, 16, seed=0)
    assert torch.equal(c.ids, again.ids) and c.tokens_sha256 == again.tokens_sha256
    other = calib.calibration_windows(tokenizer, str(p), 3, 16, seed=1)
    assert not torch.equal(c.ids, other.ids) and c.sha256 == other.sha256


@pytest.mark.parametrize("case,exc,match", [
    ("missing", CoalaError, "cannot read calibration text"),
    ("empty", CoalaError, "is empty"),
    ("latin1", CoalaError, "not UTF-8"),
    ("short", CoalaError, r"too short: \d+ tokens.*at most \d+ samples"),
    ("seq_len_1", UsageError, "at least 2"),
    ("seq_len_long", UsageError, "exceeds the model's maximum of 128"),
    ("samples_0", UsageError, "at least 1"),
])
def test_errors(tokenizer, tmp_path, case, exc, match):
    p = tmp_path / "t.txt"
    samples, seq_len = 2, 16
    if case == "empty":
        p.write_text("  \n")
    elif case == "latin1":
        p.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    elif case != "missing":
        p.write_text("some words " * 50)
    if case == "short":
        samples = 1000
    seq_len = {"seq_len_1": 1, "seq_len_long": 129}.get(case, seq_len)
    samples = 0 if case == "samples_0" else samples
    with pytest.raises(exc, match=match):
        calib.calibration_windows(tokenizer, str(p), samples, seq_len, max_len=128)


def test_builtin_calibration_and_heldout_parts_are_disjoint_and_cover_the_text():
    cal, held, whole = (calib.builtin_text(p) for p in calib.BUILTIN_NAMES)
    assert len(held) > 0.15 * len(whole) and len(cal) > 0.6 * len(whole)
    # every topic lands in a part and the lengths add up, so no topic is in both
    from pydoc_data.topics import topics
    assert all(text in cal or text in held for text in topics.values())
    assert len(cal) + len(held) + len("\n\n") == len(whole)


def test_unknown_builtin_part_is_a_usage_error():
    with pytest.raises(calib.UsageError, match="builtin:heldout"):
        calib.builtin_text("builtin:test")
