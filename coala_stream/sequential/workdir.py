"""The sequential capture's work directory: hidden states, progress record, pending chunks.

``--hidden-dir`` (default ``OUT.sequential``, deleted when the capture completes)::

    progress.json          {format, store_uuid, next_block, src, probe_crc32, captured}, atomic
    hidden.zarr/a, /b      (samples x seq_len x hidden) in the model dtype (bf16/fp16 as
                           uint16 bits), one chunk per sample; attributes
                           {block: k whose output it holds (-1: embeddings), samples: rows valid}
    pending/<input>.safetensors   the last, partial chunk of an input (atomic)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..errors import StoreError
from ..store import format as fmt

WORK_FORMAT = "coala-stream/sequential"


class WorkDir:
    """``--hidden-dir``: see the module docstring."""

    def __init__(self, path: Path, samples: int, seq_len: int, dtype: str):
        self.path, self.samples, self.seq_len, self.dtype = Path(path), samples, seq_len, dtype
        self._group = None

    @property
    def progress_path(self) -> Path:
        return self.path / "progress.json"

    def pending_path(self, name: str) -> Path:
        return self.path / "pending" / f"{name}.safetensors"

    def read_progress(self) -> dict | None:
        try:
            rec = json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("format") == WORK_FORMAT else None

    def write_progress(self, rec: dict) -> None:
        checkpoint.atomic_write(self.progress_path,
                                json.dumps({"format": WORK_FORMAT, **rec}, sort_keys=True).encode())

    def reset(self) -> None:
        """Delete what a run made here and start empty; refuse a directory that is not ours."""
        if self.path.exists():
            if not self.path.is_dir() or not self._ours():
                raise StoreError(f"{self.path} exists and is not a sequential-capture work "
                                 f"directory; choose another --hidden-dir (capture never deletes "
                                 f"what it did not write)")
            shutil.rmtree(self.path)
        (self.path / "pending").mkdir(parents=True)
        self._group = None

    def _ours(self) -> bool:
        """Holds nothing but what `WorkDir` writes (or nothing)."""
        return all(p.name in ("progress.json", "hidden.zarr", "pending")
                   or p.name.startswith(".progress.json" + checkpoint.TEMP_MARK)
                   for p in self.path.iterdir())

    def remove(self) -> None:
        if self.path.is_dir() and self._ours():
            shutil.rmtree(self.path)

    # hidden states
    def group(self):
        import zarr

        if self._group is None:
            self._group = zarr.open_group(store=zarr.storage.LocalStore(self.path / "hidden.zarr"),
                                          mode="a")
        return self._group

    def array(self, name: str, hidden: int | None = None):
        g = self.group()
        if name in g.array_keys():
            arr = g[name]
            if hidden is None or arr.shape == (self.samples, self.seq_len, hidden):
                return arr
        if hidden is None:
            return None
        return g.create_array(name, shape=(self.samples, self.seq_len, hidden),
                              dtype=fmt.stored_dtype(self.dtype),
                              chunks=(1, self.seq_len, hidden), compressors=None, fill_value=0,
                              attributes={"block": None, "samples": 0}, overwrite=True)

    def state(self, name: str) -> tuple[int | None, int]:
        """(block whose output array ``name`` holds, samples of it written)."""
        arr = self.array(name)
        if arr is None:
            return None, 0
        a = arr.attrs.asdict()
        return a.get("block"), int(a.get("samples", 0))

    def set_state(self, name: str, block: int, samples: int) -> None:
        self.array(name).update_attributes({"block": block, "samples": samples})  # one write

    def claim(self, name: str, block: int, hidden: int) -> None:
        """Array ``name`` holds an older block's output: make it block ``block``'s, empty."""
        self.array(name, hidden)
        self.set_state(name, block, 0)

    def write(self, name: str, start: int, t: torch.Tensor, block: int) -> None:
        arr = self.array(name, t.shape[-1])
        arr[start:start + t.shape[0]] = fmt.to_stored(t)  # data first, then the count
        self.set_state(name, block, start + t.shape[0])

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return fmt.from_stored(np.asarray(self.array(name)[start:stop]), self.dtype)


def default_hidden_dir(out: str) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".sequential")
