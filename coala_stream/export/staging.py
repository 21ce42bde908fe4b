"""Outputs appear whole or not at all: built in a staging directory, published by a rename."""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint import fsync_dir
from ..errors import UsageError


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
