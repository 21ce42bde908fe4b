"""Calibration records from JSON Lines, Parquet and Arrow files or directories of them.

``calib.read_data`` uses this module for every ``--data`` that is not a plain
text file or ``builtin``. Each reader feeds one value per record (the text
field, or the ``messages`` list for ``--chat-template``) to a `Records`, which
checks it and says where a bad one is, so every problem is one line naming
the file, the line (JSON Lines, counting from 1) or row (Parquet / Arrow,
counting from 0, as ``Dataset[i]`` does) and how to fix it.

Layouts:

- ``FILE.jsonl``: one JSON object per line.
- ``FILE.parquet``; ``FILE.arrow``: an Arrow IPC stream (or file).
- a directory written by ``datasets.Dataset.save_to_disk``: ``state.json``
  lists its Arrow IPC stream files (``data-*.arrow``) in order. It is read
  with pyarrow alone, so the ``datasets`` package is not needed.
- a datasets-style directory of ``.jsonl`` or ``.parquet`` files (searched
  recursively, in sorted path order). If the names say which split a file
  belongs to (``train-00000-of-00002.parquet``, ``data/test/...``), only the
  train split is read, so evaluation text never leaks into calibration.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path

from .errors import CoalaError

SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
# datasets' split keywords (datasets.data_files), so a directory is split as load_dataset would
SPLIT_WORDS = {"train": "train", "training": "train",
               "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}
_SPLIT_SEP = re.compile(r"[-._ 0-9]+")  # what may surround a split keyword in a name


@dataclass
class Records:
    """Checked values of one field, collected record by record.

    ``field`` is the text field, or ``messages`` with ``chat``. Empty texts
    are counted in ``skipped`` instead of kept: datasets of lines (WikiText's
    rows) hold many, and they carry no tokens.
    """

    field: str
    chat: bool
    values: list = dc_field(default_factory=list)
    where: list[str] = dc_field(default_factory=list)  # chat only: the place of each record
    seen: int = 0
    skipped: int = 0

    def add(self, value, where: str) -> None:
        self.seen += 1
        if self.chat:
            self.values.append(check_messages(value, where))
            self.where.append(where)
        elif value is None:
            raise CoalaError(f"{where}: field {self.field!r} is null; fill it in or remove "
                             f"the record")
        elif not isinstance(value, str):
            raise CoalaError(f"{where}: field {self.field!r} is {_kind(value)}, not a string; "
                             f"pass --text-field naming a field that holds text")
        elif value:
            self.values.append(value)
        else:
            self.skipped += 1

    def missing(self, fields, where: str) -> CoalaError:
        """The error for a record (or table) without ``field``; ``fields`` are those it has."""
        fields = [str(f) for f in fields]
        more = f" and {len(fields) - 20} more" if len(fields) > 20 else ""
        have = ", ".join(fields[:20]) + more
        fix = ("--chat-template needs records with a 'messages' list of {role, content}; "
               "drop --chat-template to read a text field" if self.chat else
               "pass --text-field with the name of the field that holds the text"
               + (", or --chat-template to render 'messages'" if "messages" in fields else ""))
        return CoalaError(f"{where} has no field {self.field!r} "
                          f"(its fields: {have or 'none'}); {fix}")


def _kind(value) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} ({repr(value)[:40]})"


def check_messages(value, where: str) -> list[dict]:
    """``value`` as a chat: a non-empty list of {role: str, content: str}; CoalaError if not."""
    fix = "each record's 'messages' must be a list of {\"role\": ..., \"content\": ...}"
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else _kind(value)
        raise CoalaError(f"{where}: 'messages' is {what}; {fix}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise CoalaError(f"{where}: messages[{i}] is {_kind(msg)}, not an object; {fix}")
        for key in ("role", "content"):
            if key not in msg:
                raise CoalaError(f"{where}: messages[{i}] has no {key!r} (its keys: "
                                 f"{', '.join(map(str, msg)) or 'none'}); {fix}")
            if not isinstance(msg[key], str):
                raise CoalaError(f"{where}: messages[{i}].{key} is {_kind(msg[key])}, "
                                 f"not a string; {fix}")
    return value


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CoalaError(f"cannot read calibration data {path}: {exc.strerror or exc}") from exc


def read_jsonl(path: Path, rec: Records) -> None:
    """Every line of ``path`` is a JSON object holding ``rec.field``."""
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM would fail json.loads
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise CoalaError(f"calibration data {path} is not UTF-8 (byte {exc.start}, line {line}:"
                         f" {exc.reason}); convert it, e.g. iconv -t UTF-8") from exc
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for n, line in enumerate(lines, 1):
        where = f"{path} line {n}"
        if not line.strip():
            raise CoalaError(f"{where} is empty; JSON Lines holds one JSON object per line, "
                             f"so remove the blank line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CoalaError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); "
                             f"each line must be one JSON object") from exc
        if not isinstance(obj, dict):
            raise CoalaError(f"{where} is {_kind(obj)}, not a JSON object; each line must be "
                             f"one object such as {{\"{rec.field}\": ...}}")
        if rec.field not in obj:
            raise rec.missing(obj, where)
        rec.add(obj[rec.field], where)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as exc:
        raise CoalaError("reading Parquet or Arrow calibration data needs pyarrow: "
                         "pip install pyarrow") from exc
    return pyarrow


def _add_table(table, path: Path, rec: Records) -> None:
    """Feed ``table``'s ``rec.field`` column, row by row, to ``rec``."""
    if rec.field not in table.column_names:
        raise rec.missing(table.column_names, str(path))
    for i, value in enumerate(table.column(rec.field).to_pylist()):
        rec.add(value, f"{path} row {i} (0-based)")


def read_parquet(path: Path, rec: Records) -> None:
    pa = _pyarrow()
    try:
        names = pa.parquet.read_schema(path).names
        if rec.field not in names:  # before reading: a missing column is the common mistake
            raise rec.missing(names, str(path))
        table = pa.parquet.read_table(path, columns=[rec.field])
    except (OSError, pa.ArrowException) as exc:
        raise CoalaError(f"cannot read calibration data {path} as Parquet: {exc}") from exc
    _add_table(table, path, rec)


def read_arrow(path: Path, rec: Records) -> None:
    """An Arrow IPC stream (what save_to_disk writes) or, failing that, an IPC file."""
    pa = _pyarrow()
    try:
        src = pa.memory_map(str(path))
    except OSError as exc:
        raise CoalaError(f"cannot read calibration data {path}: {exc}") from exc
    with src:  # the table's buffers are views of the map: use them before it closes
        try:
            try:
                table = pa.ipc.open_stream(src).read_all()
            except pa.ArrowInvalid:
                src.seek(0)
                table = pa.ipc.open_file(src).read_all()
        except (OSError, pa.ArrowException) as exc:
            raise CoalaError(f"cannot read calibration data {path} as Arrow IPC: {exc}") from exc
        _add_table(table, path, rec)


def read_saved_dataset(root: Path, rec: Records) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in ``state.json``'s order."""
    try:
        state = json.loads((root / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CoalaError(f"{root / 'state.json'} is not a datasets save_to_disk state "
                         f"({type(exc).__name__}: {exc}); save the dataset again with "
                         f"Dataset.save_to_disk") from exc
    files = [root / name for name in names]
    for f in files:
        if not f.is_file():
            raise CoalaError(f"{root / 'state.json'} lists {f.name}, which is missing; "
                             f"copy the whole directory or save the dataset again")
        read_arrow(f, rec)
    return files


def split_of(rel: Path) -> str | None:
    """The split a data file belongs to by datasets' naming rules, or None."""
    for part in rel.parts:
        for word in _SPLIT_SEP.split(part.lower()):
            if word in SPLIT_WORDS:
                return SPLIT_WORDS[word]
    return None


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)  # .cache/, .git/: not data


def data_files(root: Path) -> tuple[list[Path], str]:
    """(files to read, note on the split) for a directory of .jsonl / .parquet files."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".jsonl", ".parquet")
                   and p.is_file() and not _hidden(p.relative_to(root)))
    if not files:
        raise CoalaError(f"{root} holds no .jsonl or .parquet files and no state.json of "
                         f"Dataset.save_to_disk; pass a directory of data files or one file")
    kinds = {p.suffix for p in files}
    if len(kinds) > 1:
        raise CoalaError(f"{root} holds both .jsonl and .parquet files; pass a directory "
                         f"with one format, or one file")
    splits = {p: split_of(p.relative_to(root)) for p in files}
    named = sorted({s for s in splits.values() if s})
    if not named:
        return files, ""
    if "train" not in named:
        raise CoalaError(f"{root} holds the splits {', '.join(named)} but no train split; "
                         f"pass the directory or file of the split to calibrate on")
    return [p for p in files if splits[p] == "train"], ", train split"


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "arrow": read_arrow}
