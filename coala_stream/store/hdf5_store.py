"""HDF5 backend: one file, the same logical layout as the Zarr store.

`/inputs/<name>` datasets (tokens x n), chunked (chunk_tokens x n), byte-shuffle +
gzip level 1 (the filters every HDF5 build has) + fletcher32, so a flipped bit
fails the read. HDF5 attributes do not nest: every attribute, root and per
input, holds the JSON text of the value the Zarr store keeps natively.

Crash safety, and its limits (measured with kill -9 of a writer looping
write-chunks/commit, see tests/test_store.py::test_kill_then_resume):
- The file is flushed after every commit, so a commit survives a killed process
  (not a power cut: nothing is fsynced). After a kill the file opens again, the
  committed rows read back with matching checksums, and `rollback` shrinks the
  datasets to the committed rows.
- We keep HDF5's default (earliest) file format on purpose. With libver="latest"
  the superblock records "open for writing", and after a kill the file refuses to
  open until `h5clear -s` is run on it (h5py cannot clear the flag); SWMR mode has
  the same flag and forbids creating datasets or growing attributes while writing,
  which capture needs.
- An exception inside a commit (KeyboardInterrupt, a signal handler's) leaves every
  attribute old or new: attributes are rewritten in place (`_write_attrs`), never
  deleted and recreated (tests/test_store.py interrupts a commit at every line).
- HDF5 does not journal its metadata: if the library evicts half-updated metadata
  between two commits and the process dies there, the file can be left
  unreadable. It did not happen in our kill tests, but it is not excluded by
  construction as it is for Zarr (whole-file atomic renames). Use the Zarr
  backend where a crash must never cost the store.
- Space of rows dropped by `rollback` is not returned to the file system, and a
  resumed file is equal to an uninterrupted one in content, not byte for byte.
- A file being written cannot be opened by another process (HDF5 file locking):
  `status` of a running HDF5 capture fails with a StoreError saying so.
- A full disk: HDF5 that runs out of space half-way through writing its metadata
  leaves its objects in a state whose clean-up crashed the interpreter (exit 139, issue
  22). So the writer never lets HDF5 meet ENOSPC: before each write of rows it checks
  that the file system can take those rows plus everything not yet flushed (uncompressed,
  +10 %) plus `SPACE_MARGIN` for metadata, and raises ENOSPC itself otherwise; the file
  then closes cleanly and keeps its last commit. (Another process filling the disk
  between the check and the write is not covered.)
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from . import format as fmt
from .base import Store

SPACE_MARGIN = 4 << 20  # bytes kept free for HDF5's metadata (attributes, B-trees, crc32s)
CRC_GROUP = "crc32"  # per input: a growing uint32 dataset of its chunks' crc32s
FILTERS = {"shuffle": True, "compression": "gzip", "compression_opts": 1, "fletcher32": True}


def _dump(attrs: dict) -> dict:
    return {k: json.dumps(v) for k, v in attrs.items()}


def _write_attrs(manager: h5py.AttributeManager, attrs: dict) -> None:
    """Set JSON-text attributes, each existing one rewritten in place.

    h5py's `attrs[k] = v` deletes the attribute and creates it anew in two library calls:
    an exception between them (KeyboardInterrupt, a signal handler's) lost the attribute,
    `committed_tokens` or the root `capture` record, and with it the store. `modify` of a
    variable-length string is one library call, which Python cannot interrupt halfway.
    """
    for key, text in _dump(attrs).items():
        if key in manager and _is_text(manager.get_id(key).dtype):
            manager.modify(key, text)
        else:  # a new attribute, or one of another type (a foreign writer's): nothing to lose
            manager[key] = text


def _is_text(dtype) -> bool:
    info = h5py.check_string_dtype(dtype)
    return info is not None and info.length is None


def _load(attrs: h5py.AttributeManager) -> dict:
    return {k: _decode(v) for k, v in attrs.items()}


def _decode(value):
    """JSON text back to its value; anything else (a foreign file's attribute) as it is,
    so that open_store can say "not a coala-stream store" rather than fail to parse."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.tolist() if hasattr(value, "tolist") else value


def init_hdf5(path: Path, attrs: dict) -> None:
    """Create the file with JSON-text root `attrs` and the empty `inputs` group."""
    with h5py.File(path, "w-") as f:
        _write_attrs(f.attrs, attrs)
        f.create_group("inputs")
        f.create_group(CRC_GROUP)


def open_h5(path: Path, writable: bool) -> h5py.File:
    try:
        return h5py.File(path, "r+" if writable else "r")
    except OSError as exc:
        text = str(exc).lower()
        # h5py's messages: "unable to lock file, errno = 11" while a writer holds it; a cut
        # file's "truncated file: eof = ..., sblock->base_addr" holds "lock" too (superblock)
        if "truncated file" in text:
            raise StoreError(
                f"HDF5 store {path} is truncated (shorter than its own header says: a copy cut "
                "short, or a disk that filled up); the data past the cut is gone: recapture "
                "with --overwrite (or copy the file again)"
            ) from exc
        if "unable to lock" in text or "lock file" in text:
            raise StoreError(
                f"HDF5 store {path} is open for writing by another process (a running capture?) "
                "and HDF5 allows no reader meanwhile; wait for it, or use the zarr backend to "
                "follow a running capture"
            ) from exc
        raise StoreError(
            f"HDF5 store {path} cannot be opened ({exc}); if a capture was killed while the "
            "library was writing metadata the file may be damaged: recapture with --overwrite"
        ) from exc


class Hdf5Store(Store):
    backend = "hdf5"

    def __init__(self, path: Path, writable: bool):
        super().__init__(path, writable)
        self._f = open_h5(self.path, writable)
        self._unflushed = 0  # bytes of rows written since the last flush (at most in HDF5's caches)

    @property
    def reduce_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".reduce")

    @property
    def applied_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".applied")

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    def _ds(self, name: str) -> h5py.Dataset:
        try:
            return self._f["inputs"][name]
        except KeyError:
            raise StoreError(
                f"no input {name!r} in {self.path}; it has {len(self._f['inputs'])} inputs "
                "(list them with `coala-stream status`)"
            ) from None

    def _root_attrs(self) -> dict:
        return _load(self._f.attrs)

    def _update_root_attrs(self, attrs: dict) -> None:
        _write_attrs(self._f.attrs, attrs)

    def _input_names(self) -> list[str]:
        return list(self._f["inputs"].keys())

    def _input_attrs(self, name: str) -> dict:
        return _load(self._ds(name).attrs)

    def _set_input_attrs(self, name: str, attrs: dict) -> None:
        _write_attrs(self._ds(name).attrs, attrs)

    def _new_array(self, name: str, n: int, attrs: dict) -> None:
        ct = int(self._root_attrs()["chunk_tokens"])
        ds = self._f["inputs"].create_dataset(
            name, shape=(0, n), maxshape=(None, n), chunks=(ct, n),
            dtype=fmt.stored_dtype(attrs["logical_dtype"]), **FILTERS,
        )
        _write_attrs(ds.attrs, attrs)

    def _rows(self, name: str) -> int:
        return self._ds(name).shape[0]

    def _n(self, name: str) -> int:
        return self._ds(name).shape[1]

    def _read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._ds(name)[start:stop]

    def _write_rows(self, name: str, start: int, a: np.ndarray) -> None:
        self._check_space(a.nbytes)
        self._ds(name)[start : start + len(a)] = a
        self._unflushed += a.nbytes

    def _check_space(self, nbytes: int) -> None:
        """OSError(ENOSPC) before HDF5 could meet a full disk (module docstring)."""
        need = int((self._unflushed + nbytes) * 1.1) + SPACE_MARGIN
        free = free_bytes(self.path.parent)
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device ({free} bytes free, the next "
                          f"write needs up to {need})", str(self.path))

    def _resize(self, name: str, rows: int) -> None:
        self._ds(name).resize(rows, axis=0)

    def stored_bytes(self, name: str) -> int:
        return int(self._ds(name).id.get_storage_size())

    def _read_crcs(self, name: str, count: int) -> list[int]:
        ds = self._f.get(f"{CRC_GROUP}/{name}")
        return [] if ds is None else [int(c) for c in ds[: min(count, ds.shape[0])]]

    def _write_crcs(self, name: str, start: int, crcs) -> None:
        if not crcs:
            return
        group = self._f.require_group(CRC_GROUP)
        ds = group.get(name) or group.create_dataset(name, shape=(0,), maxshape=(None,),
                                                     chunks=(1024,), dtype="<u4")
        if ds.shape[0] < start + len(crcs):
            ds.resize(start + len(crcs), axis=0)
        ds[start:start + len(crcs)] = np.asarray(crcs, dtype="<u4")

    def _truncate_crcs(self, name: str, count: int) -> None:
        ds = self._f.get(f"{CRC_GROUP}/{name}")
        if ds is not None and ds.shape[0] > count:
            ds.resize(count, axis=0)

    def chunk_bytes(self, name: str, index: int) -> tuple[object, int]:
        ds = self._ds(name)
        try:
            size = int(ds.id.get_chunk_info_by_coord((index * ds.chunks[0], 0)).size)
        except (KeyError, ValueError, RuntimeError):
            size = 0
        return (name, index), size

    def _remove_half_created(self) -> list[str]:
        # A dataset and its attributes are separate HDF5 writes: a kill in between leaves
        # a dataset without attributes, never committed. Delete it; capture recreates it.
        broken = [nm for nm in self._input_names() if "consumers" not in self._ds(nm).attrs]
        for nm in broken:
            del self._f["inputs"][nm]
            if f"{CRC_GROUP}/{nm}" in self._f:
                del self._f[CRC_GROUP][nm]
        return broken

    def _flush(self) -> None:
        self._f.flush()
        self._unflushed = 0


def free_bytes(directory: Path) -> int:
    """Bytes the file system holding ``directory`` has free for us (a test replaces it)."""
    return shutil.disk_usage(directory).free
