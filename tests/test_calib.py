"""Calibration windows: deterministic, non-overlapping, inside the text; clear errors."""

from __future__ import annotations

import hashlib
import json
import re
import sys

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


# ---------------------------------------------------------------------------
# Record formats: JSON Lines, Parquet, Arrow, dataset directories

try:  # a dependency of the package; without it only the Parquet / Arrow tests skip
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")


@pytest.fixture(scope="module")
def texts():
    """About 60 non-empty paragraphs (some 3k tokens): records for every format."""
    paras = [p for p in calib.builtin_text()[:9000].split("\n\n") if p.strip()]
    assert len(paras) > 20
    return paras


def _table(texts, field="body"):
    return pa.table({"id": list(range(len(texts))), field: texts})


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_stream(path, table):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return path


def _write_saved(root, table, parts=2):
    """What Dataset.save_to_disk writes, by hand: IPC streams listed in state.json."""
    root.mkdir()
    names = [f"data-{i:05d}-of-{parts:05d}.arrow" for i in range(parts)]
    cut = [k * table.num_rows // parts for k in range(parts + 1)]
    for i, name in enumerate(names):
        _write_stream(root / name, table.slice(cut[i], cut[i + 1] - cut[i]))
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (root / "dataset_info.json").write_text("{}")
    return root


def _write_format(fmt, tmp_path, texts):
    half = len(texts) // 2
    if fmt == "jsonl":
        return _write_jsonl(tmp_path / "d.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts)])
    if fmt != "dir-jsonl" and pa is None:
        pytest.skip("pyarrow is not installed")
    table = _table(texts) if pa is not None else None
    if fmt == "parquet":
        pq.write_table(table, tmp_path / "d.parquet")
        return tmp_path / "d.parquet"
    if fmt == "arrow-stream":
        return _write_stream(tmp_path / "d.arrow", table)
    if fmt == "arrow-file":
        with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, \
                pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        return tmp_path / "d.arrow"
    if fmt == "saved":
        return _write_saved(tmp_path / "saved", table)
    root = tmp_path / "dir"
    (root / "data").mkdir(parents=True)
    # file names sort in record order; the second sorts after the first
    if fmt == "dir-jsonl":
        _write_jsonl(root / "data" / "part-0.jsonl", [{"body": t} for t in texts[:half]])
        _write_jsonl(root / "data" / "part-1.jsonl", [{"body": t} for t in texts[half:]])
    else:
        pq.write_table(table.slice(0, half), root / "data" / "part-0.parquet")
        pq.write_table(table.slice(half), root / "data" / "part-1.parquet")
    return root


FORMATS = {"jsonl": "jsonl", "parquet": "parquet", "arrow-stream": "arrow", "arrow-file": "arrow",
           "saved": "arrow", "dir-jsonl": "jsonl", "dir-parquet": "parquet"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_joined_texts_and_the_text_files_windows(tokenizer, tmp_path,
                                                                        texts, fmt):
    joined = "\n\n".join(texts)
    txt = tmp_path / "joined.txt"
    txt.write_text(joined, encoding="utf-8")
    path = _write_format(fmt, tmp_path, texts)
    src = calib.read_data(str(path), text_field="body")
    assert src.text == joined and src.format == FORMATS[fmt] and src.field == "body"
    assert src.sha256 == hashlib.sha256(joined.encode()).hexdigest()
    assert f"{len(texts)} records" in src.source and str(path.resolve()) in src.source
    c = calib.calibration_windows(tokenizer, str(path), 3, 16, seed=5, text_field="body")
    plain = calib.calibration_windows(tokenizer, str(txt), 3, 16, seed=5)
    assert torch.equal(c.ids, plain.ids) and c.starts == plain.starts
    assert (c.format, c.field, c.chat_template) == (FORMATS[fmt], "body", False)
    assert c.sha256 == plain.sha256 and c.tokens_sha256 == plain.tokens_sha256
    assert (plain.format, plain.field) == ("text", None)


@needs_pyarrow
def test_a_real_save_to_disk_directory(tmp_path, texts):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    src = calib.read_data(str(tmp_path / "ds"))
    assert src.text == "\n\n".join(texts) and (src.format, src.field) == ("arrow", "text")
    assert "3 Arrow file(s)" in src.source
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CoalaError, match=r"saved DatasetDict \(splits: test, train\).*dd/train"):
        calib.read_data(str(tmp_path / "dd"))


def test_same_seed_same_windows_other_seed_other_windows(tokenizer, tmp_path, texts):
    path = _write_format("dir-jsonl", tmp_path, texts)
    a, b, other = (calib.calibration_windows(tokenizer, str(path), 4, 16, seed=s, text_field="body")
                   for s in (2, 2, 3))
    assert torch.equal(a.ids, b.ids) and a.tokens_sha256 == b.tokens_sha256
    assert not torch.equal(a.ids, other.ids) and a.sha256 == other.sha256


def test_a_read_source_is_used_as_is(tokenizer, tmp_path, texts, monkeypatch):
    path = _write_format("jsonl", tmp_path, texts)
    src = calib.read_data(str(path), text_field="body")
    want = calib.calibration_windows(tokenizer, str(path), 3, 16, 1, text_field="body")
    monkeypatch.setattr(calib, "read_data", lambda *a, **k: pytest.fail("data read twice"))
    got = calib.calibration_windows(tokenizer, src, 3, 16, 1)
    assert torch.equal(got.ids, want.ids) and got.attrs() == want.attrs()


def test_load_text_joins_records_and_keeps_builtin(tmp_path, texts):
    rows = [{"text": t} for t in texts[:3]]
    text, source = calib.load_text(str(_write_jsonl(tmp_path / "t.jsonl", rows)))
    assert text == "\n\n".join(texts[:3]) and "3 records" in source
    text, source = calib.load_text("builtin:heldout")
    assert text == calib.builtin_text("builtin:heldout") and "held-out part" in source


def test_jsonl_with_a_bom_and_crlf_line_ends(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert calib.read_data(str(path)).text == "a\n\nb"


def test_empty_records_are_skipped_and_counted(tmp_path):
    rows = [{"text": "alpha"}, {"text": ""}, {"text": "beta"}, {"text": ""}]
    src = calib.read_data(str(_write_jsonl(tmp_path / "d.jsonl", rows)))
    assert src.text == "alpha\n\nbeta" and "4 records, 2 empty skipped" in src.source


@needs_pyarrow
def test_data_directory_reads_only_the_train_split(tmp_path, texts):
    root = tmp_path / "wiki"
    (root / "data").mkdir(parents=True)
    for name, part in [("train-00000-of-00002", texts[:10]), ("train-00001-of-00002", texts[10:20]),
                       ("test-00000-of-00001", ["held out"]), ("validation-00000-of-00001", ["dev"])]:
        pq.write_table(pa.table({"text": part}), root / "data" / f"{name}.parquet")
    src = calib.read_data(str(root))
    assert src.text == "\n\n".join(texts[:20]) and "2 parquet file(s), train split" in src.source
    (root / "data" / "train-00000-of-00002.parquet").unlink()
    (root / "data" / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(CoalaError, match="splits test, validation but no train split"):
        calib.read_data(str(root))


def test_split_names_follow_datasets_rules():
    from pathlib import Path

    from coala_stream.calib_formats import split_of

    assert split_of(Path("data/train-00000-of-00001.parquet")) == "train"
    assert split_of(Path("wikitext-2-raw-v1-validation.parquet")) == "validation"
    assert split_of(Path("test/part-0.jsonl")) == "test"
    assert split_of(Path("data/trainer_logs.jsonl")) is None
    assert split_of(Path("my_test.jsonl")) == "test"  # datasets' separators: -._ space digits
    assert split_of(Path("contest/testament.jsonl")) is None


# ---------------------------------------------------------------------------
# Bad data: one line naming the file, the line or row and the fix, before any tokenizer

def _bad(tmp_path, case):
    """(path, read_data kwargs) of one kind of bad data."""
    jl = tmp_path / "d.jsonl"
    pqf = tmp_path / "d.parquet"
    good = json.dumps({"text": "fine"})
    lines = {
        "jsonl_missing_field": [json.dumps({"body": "x", "id": 1})],
        "jsonl_missing_later": [good, good, json.dumps({"txt": "y"})],
        "jsonl_invalid": [good, '{"text": "a" "b"}'],
        "jsonl_blank_line": [good, "   ", good],
        "jsonl_not_object": ['["text"]'],
        "jsonl_int": [good, json.dumps({"text": 7})],
        "jsonl_null": [json.dumps({"text": None})],
        "jsonl_has_messages": [json.dumps({"messages": [], "id": 1})],
        "jsonl_all_empty": [json.dumps({"text": ""})] * 2,
        "jsonl_whitespace": [json.dumps({"text": " \n "})],
        "chat_missing": [json.dumps({"text": "hi"})],
        "chat_not_list": [json.dumps({"messages": "hi"})],
        "chat_no_content": [json.dumps({"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "text": "b"}]})],
        "chat_content_int": [json.dumps({"messages": [{"role": "user", "content": 3}]})],
        "chat_empty_list": [json.dumps({"messages": []})],
    }
    kwargs = {"chat_template": True} if case.startswith("chat") else {}
    if case in lines:
        jl.write_text("\n".join(lines[case]) + "\n", encoding="utf-8")
        return jl, kwargs
    if case == "jsonl_latin1":
        jl.write_bytes(good.encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    elif case == "jsonl_no_records":
        jl.write_bytes(b"")
    elif case == "parquet_missing_column":
        pq.write_table(pa.table({"body": ["x"], "id": [1]}), pqf)
    elif case == "parquet_int_column":
        pq.write_table(pa.table({"text": [1, 2]}), pqf)
    elif case == "parquet_null":
        pq.write_table(pa.table({"text": ["a", None]}), pqf)
    elif case == "parquet_no_rows":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), pqf)
    elif case == "parquet_corrupt":
        pqf.write_bytes(b"PAR1 not really")
    elif case == "arrow_corrupt":
        (tmp_path / "d.arrow").write_bytes(b"\x00" * 64)
        return tmp_path / "d.arrow", kwargs
    elif case == "saved_missing_file":
        root = _write_saved(tmp_path / "saved", pa.table({"text": ["a", "b"]}))
        (root / "data-00001-of-00002.arrow").unlink()
        return root, kwargs
    elif case == "saved_bad_state":
        root = _write_saved(tmp_path / "saved", pa.table({"text": ["a", "b"]}))
        (root / "state.json").write_text('{"files": []}')
        return root, kwargs
    elif case == "dir_empty":
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / "notes.txt").write_text("not data")
        return tmp_path / "dir", kwargs
    elif case == "dir_mixed":
        (tmp_path / "dir").mkdir()
        _write_jsonl(tmp_path / "dir" / "a.jsonl", [{"text": "a"}])
        pq.write_table(pa.table({"text": ["b"]}), tmp_path / "dir" / "b.parquet")
        return tmp_path / "dir", kwargs
    elif case == "chat_plain_text":
        (tmp_path / "t.txt").write_text("plain words")
        return tmp_path / "t.txt", kwargs
    elif case == "empty_text_field":
        jl.write_text(good + "\n")
        return jl, {"text_field": ""}
    elif case == "jsonl_missing_file":
        return tmp_path / "nope.jsonl", kwargs
    return (jl if case.startswith("jsonl") else pqf), kwargs


BAD = {
    "jsonl_missing_field": r"d\.jsonl line 1 has no field 'text' \(its fields: body, id\); pass --text-field",
    "jsonl_missing_later": r"line 3 has no field 'text' \(its fields: txt\)",
    "jsonl_has_messages": r"has no field 'text' \(its fields: messages, id\).*or --chat-template",
    "jsonl_invalid": r"d\.jsonl line 2 is not valid JSON \(Expecting .* column \d+\)",
    "jsonl_blank_line": r"line 2 is empty; .*remove the blank line",
    "jsonl_not_object": r"line 1 is list .*not a JSON object",
    "jsonl_int": r"line 2: field 'text' is int \(7\), not a string; pass --text-field",
    "jsonl_null": r"line 1: field 'text' is null; fill it in or remove the record",
    "jsonl_all_empty": r"all 2 records have an empty 'text'",
    "jsonl_whitespace": r"calibration text .*d\.jsonl.* is empty",
    "jsonl_latin1": r"d\.jsonl is not UTF-8 \(byte 30, line 2: invalid continuation byte\); .*iconv",
    "jsonl_no_records": r"d\.jsonl holds no records",
    "jsonl_missing_file": r"cannot read calibration data .*nope\.jsonl",
    "parquet_missing_column": r"d\.parquet has no field 'text' \(its fields: body, id\); pass --text-field",
    "parquet_int_column": r"d\.parquet row 0 \(0-based\): field 'text' is int",
    "parquet_null": r"d\.parquet row 1 \(0-based\): field 'text' is null",
    "parquet_no_rows": r"d\.parquet holds no records",
    "parquet_corrupt": r"cannot read calibration data .*d\.parquet as Parquet",
    "arrow_corrupt": r"cannot read calibration data .*d\.arrow as Arrow IPC",
    "saved_missing_file": r"state\.json lists data-00001-of-00002\.arrow, which is missing",
    "saved_bad_state": r"state\.json is not a datasets save_to_disk state",
    "dir_empty": r"dir holds no \.jsonl or \.parquet files",
    "dir_mixed": r"both \.jsonl and \.parquet",
    "chat_missing": r"line 1 has no field 'messages' \(its fields: text\); --chat-template needs",
    "chat_not_list": r"line 1: 'messages' is str \('hi'\); each record's 'messages' must be a list",
    "chat_no_content": r"line 1: messages\[1\] has no 'content' \(its keys: role, text\)",
    "chat_content_int": r"line 1: messages\[0\]\.content is int",
    "chat_empty_list": r"line 1: 'messages' is an empty list",
    "chat_plain_text": r"--chat-template needs records with a 'messages' field.*t\.txt is plain text",
    "empty_text_field": r"--text-field must name the field",
}
USAGE = {"chat_plain_text", "empty_text_field"}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_is_one_clear_line(tmp_path, case):
    if pa is None and case.split("_")[0] in ("parquet", "arrow", "saved", "dir"):
        pytest.skip("pyarrow is not installed")
    path, kwargs = _bad(tmp_path, case)
    with pytest.raises(UsageError if case in USAGE else CoalaError) as info:
        calib.read_data(str(path), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and re.search(BAD[case], msg), msg
    assert info.type is not UsageError or case in USAGE


def test_missing_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")  # never opened: the import fails first
    for mod in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    with pytest.raises(CoalaError, match="needs pyarrow: pip install pyarrow"):
        calib.read_data(str(tmp_path / "d.parquet"))


# ---------------------------------------------------------------------------
# Chat template

CHAT = ("{% for m in messages %}{% if loop.first and m.role != 'user' %}"
        "{{ raise_exception('conversations start with the user') }}{% endif %}"
        "<|{{ m.role }}|>{{ m.content }}\n{% endfor %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = CHAT
    return tok


def _chats(texts):
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in zip(texts[::2], texts[1::2])]


def test_chat_template_renders_each_record(chat_tokenizer, tmp_path, texts):
    chats = _chats(texts)
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": m, "text": "ignored"} for m in chats])
    src = calib.read_data(str(path), chat_template=True)
    assert (src.format, src.field, src.chat_template, src.text) == ("jsonl", "messages", True, None)
    rendered = "\n\n".join("".join(f"<|{m['role']}|>{m['content']}\n" for m in c) for c in chats)
    assert src.render(chat_tokenizer) == rendered
    c = calib.calibration_windows(chat_tokenizer, str(path), 3, 16, seed=4, chat_template=True)
    ids = chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert [ids[s:s + 16] for s in c.starts] == c.ids.tolist()
    assert (c.field, c.chat_template, c.sha256) == ("messages", True, src.sha256)
    if pa is None:
        return
    # the same messages from Parquet (a list<struct> column): same hash, same windows
    pq.write_table(pa.table({"messages": chats}), tmp_path / "c.parquet")
    p = calib.calibration_windows(chat_tokenizer, str(tmp_path / "c.parquet"), 3, 16, seed=4,
                                  chat_template=True)
    assert torch.equal(p.ids, c.ids) and p.sha256 == c.sha256 and p.format == "parquet"


def test_chat_template_errors(chat_tokenizer, tokenizer, tmp_path):
    ok = [{"role": "user", "content": "hi"}]
    path = _write_jsonl(tmp_path / "c.jsonl",
                        [{"messages": ok}, {"messages": [{"role": "assistant", "content": "x"}]}])
    src = calib.read_data(str(path), chat_template=True)  # the template is not known yet
    with pytest.raises(CoalaError, match=r"c\.jsonl line 2: the chat template rejects these "
                                         r"messages \(conversations start with the user\)"):
        src.render(chat_tokenizer)
    with pytest.raises(CoalaError, match="tokenizer has no chat template; drop --chat-template"):
        calib.calibration_windows(tokenizer, src, 1, 4)


# ---------------------------------------------------------------------------
# Shards of the samples

@pytest.mark.parametrize("text,want", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2 / 5 ", (2, 5))])
def test_parse_shard(text, want):
    assert calib.parse_shard(text) == want


@pytest.mark.parametrize("text,match", [
    ("4/4", r"--shard takes I/N.*e\.g\. --shard 0/4.*'4/4'.*0/4 to 3/4"),
    ("1/0", r"--shard .*'1/0'.*N must be at least 1"),
    ("-1/4", r"--shard takes I/N.*'-1/4'"),
    ("2", r"--shard takes I/N.*'2'"),
    ("a/b", r"--shard takes I/N.*'a/b'"),
])
def test_parse_shard_errors(text, match):
    with pytest.raises(UsageError, match=match):
        calib.parse_shard(text)


@pytest.fixture(scope="module")
def draw(tokenizer):
    return calib.calibration_windows(tokenizer, "builtin", 7, 8, seed=11)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_contiguous_disjoint_and_make_up_the_draw(draw, count):
    parts = [calib.shard_calibration(draw, i, count) for i in range(count)]
    assert torch.equal(torch.cat([p.ids for p in parts]), draw.ids)
    assert [s for p in parts for s in p.starts] == draw.starts
    assert [p.sample_range for p in parts] == [(i * 7 // count, (i + 1) * 7 // count)
                                               for i in range(count)]
    assert all(p.sample_range[1] > p.sample_range[0] for p in parts)
    for i, p in enumerate(parts):
        assert p.shard == (i, count) and p.tokens_sha256 == draw.tokens_sha256
        assert p.shard_tokens_sha256 == calib._tokens_sha256(draw.ids[slice(*p.sample_range)])
        assert (p.sha256, p.source, p.text_tokens) == (draw.sha256, draw.source, draw.text_tokens)
    assert len({p.shard_tokens_sha256 for p in parts}) == count
    assert (count == 1) == (parts[0].shard_tokens_sha256 == draw.tokens_sha256)
    assert draw.shard is None and draw.sample_range == (0, 7)
    assert draw.shard_tokens_sha256 == draw.tokens_sha256


def test_shard_attrs_survive_json(draw):
    a = calib.shard_calibration(draw, 1, 3).attrs()
    assert json.loads(json.dumps(a)) == a
    assert a["shard"] == [1, 3] and a["sample_range"] == [2, 4] and a["format"] == "builtin"


def test_shard_errors(draw):
    with pytest.raises(UsageError, match=r"--shard 0/8 splits --samples 7 into 8 parts.*"
                                         r"at most 7 parts"):
        calib.shard_calibration(draw, 0, 8)
    with pytest.raises(UsageError, match="--shard 3/3"):
        calib.shard_calibration(draw, 3, 3)
    with pytest.raises(ValueError, match="whole draw"):
        calib.shard_calibration(calib.shard_calibration(draw, 0, 2), 0, 2)


# ---------------------------------------------------------------------------
# Through `coala-stream capture`: the options, what the store records, resume, early errors

CAPTURE = ["--samples", "4", "--seq-len", "32", "--chunk-tokens", "64"]


def _capture(model, out, *args) -> int:
    from coala_stream.cli import main

    return main(["capture", str(model), "--out", str(out), *CAPTURE, *args])


def _calibration(out) -> dict:
    from coala_stream.store import open_store

    with open_store(out) as s:
        assert s.attrs["capture"]["complete"]
        return s.attrs["calibration"]


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with a chat template in its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("chat-model")
    src = tiny_model_dir("float32")
    for f in src.iterdir():
        shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = CHAT
    tok.save_pretrained(out)
    return out


def test_capture_records_the_calibration_and_refuses_another_field(tiny_model_dir, tmp_path,
                                                                   texts, capsys):
    model = tiny_model_dir("float32")
    path = _write_jsonl(tmp_path / "d.jsonl", [{"body": t, "title": t[:40]} for t in texts])
    out = tmp_path / "s.zarr"
    assert _capture(model, out, "--data", str(path), "--text-field", "body") == 0
    cal = _calibration(out)
    src = calib.read_data(str(path), text_field="body")
    assert (cal["source"], cal["sha256"], cal["format"], cal["field"]) == (
        src.source, src.sha256, "jsonl", "body")
    assert (cal["chat_template"], cal["shard"], cal["sample_range"], cal["samples"],
            cal["seq_len"], cal["seed"]) == (False, None, [0, 4], 4, 32, 0)
    txt = tmp_path / "joined.txt"  # the records joined: the same windows as that text file
    txt.write_text("\n\n".join(texts), encoding="utf-8")
    from transformers import AutoTokenizer

    want = calib.calibration_windows(AutoTokenizer.from_pretrained(model), str(txt), 4, 32)
    assert cal["tokens_sha256"] == want.tokens_sha256
    assert _capture(model, out, "--data", str(path), "--text-field", "body") == 0
    assert "already complete" in capsys.readouterr().out
    assert _capture(model, out, "--data", str(path), "--text-field", "title") == 1
    err = capsys.readouterr().err
    assert ("calibration field (--text-field): store has 'body', this run asks for 'title'"
            in err and err.count("\n") <= 2), err
    assert _calibration(out) == cal  # the refused run changed nothing


def test_a_saved_dataset_and_parquet_give_the_windows_of_the_jsonl(tiny_model_dir, tmp_path,
                                                                   texts):
    datasets = pytest.importorskip("datasets")
    model = tiny_model_dir("float32")
    _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    got = {}
    for name, data in (("jsonl", "d.jsonl"), ("arrow", "ds")):
        assert _capture(model, tmp_path / f"{name}.zarr", "--data", str(tmp_path / data)) == 0
        got[name] = _calibration(tmp_path / f"{name}.zarr")
    assert got["arrow"]["format"] == "arrow" and "save_to_disk" in got["arrow"]["source"]
    for key in ("sha256", "tokens_sha256", "field"):
        assert got["arrow"][key] == got["jsonl"][key], key
    if pq is not None:
        pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
        assert _capture(model, tmp_path / "p.zarr", "--data", str(tmp_path / "d.parquet")) == 0
        assert _calibration(tmp_path / "p.zarr")["tokens_sha256"] == got["jsonl"]["tokens_sha256"]


def test_chat_template_capture_is_recorded_and_not_resumed_without_it(chat_model_dir, tmp_path,
                                                                      texts, capsys):
    rows = [{"messages": m, "text": m[0]["content"]} for m in _chats(texts)]
    path = _write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "c.zarr"
    assert _capture(chat_model_dir, out, "--data", str(path), "--chat-template") == 0
    cal = _calibration(out)
    assert (cal["chat_template"], cal["field"]) == (True, "messages")
    assert cal["sha256"] == calib.read_data(str(path), chat_template=True).sha256
    assert _capture(chat_model_dir, out, "--data", str(path)) == 1
    assert "--chat-template: store has True, this run asks for False" in capsys.readouterr().err


def test_stores_made_before_the_new_calibration_fields_still_resume():
    from coala_stream.capture import settings_diff

    old = {"calibration": {"source": "t.txt", "sha256": "a", "tokens_sha256": "b",
                           "samples": 4, "seq_len": 32, "seed": 0}}
    new = {"calibration": {**old["calibration"], "format": "text", "field": None,
                           "chat_template": False, "shard": None, "sample_range": [0, 4]}}
    assert settings_diff(old, new) == []
    assert settings_diff(old, {"calibration": {**new["calibration"], "chat_template": True}})


def _no_model(monkeypatch):
    from coala_stream import models

    def never(*a, **k):
        raise AssertionError("the model (config, tokenizer or weights) was loaded")
    for name in ("load_config", "load_tokenizer", "load_model"):
        monkeypatch.setattr(models, name, never)


@pytest.mark.parametrize("case,extra,code,match", [
    ("jsonl_missing_field", [], 1, r"d\.jsonl line 1 has no field 'text'"),
    ("jsonl_all_empty", [], 1, r"all 2 records have an empty 'text'"),
    ("jsonl_blank_line", [], 1, r"line 2 is empty"),
    ("jsonl_latin1", [], 1, r"is not UTF-8 \(byte 30, line 2"),
    ("parquet_missing_column", ["--text-field", "txt"], 1, r"has no field 'txt'"),
    ("chat_plain_text", ["--chat-template"], 2, r"--chat-template needs records"),
    ("text_file_field", ["--text-field", "body"], 2, r"--text-field body names a field of "
                                                     r"records.*plain text, so drop"),
    ("jsonl_missing_field", ["--text-field", ""], 2, r"--text-field must name the field"),
    ("jsonl_missing_field", ["--shard", "2/2"], 2, r"--shard takes I/N.*I must be below N"),
    ("jsonl_missing_field", ["--shard", "0/5"], 2, r"--shard 0/5 splits --samples 4 into 5"),
])
def test_bad_data_and_options_fail_in_one_line_before_the_model_loads(tmp_path, monkeypatch,
                                                                      capsys, case, extra,
                                                                      code, match):
    if case.startswith("parquet") and pa is None:
        pytest.skip("pyarrow is not installed")
    if case == "text_file_field":
        path = tmp_path / "t.txt"
        path.write_text("plain words " * 100)
    else:
        path, _ = _bad(tmp_path, case)
    _no_model(monkeypatch)
    out = tmp_path / "never.zarr"
    assert _capture(tmp_path / "any-model", out, "--data", str(path), *extra) == code
    err = capsys.readouterr().err.strip()
    assert re.search(match, err) and err.count("\n") <= 1 and "Traceback" not in err, err
    assert not out.exists()
