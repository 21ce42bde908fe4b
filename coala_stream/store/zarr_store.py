"""Zarr v3 backend: a directory, one sharded array per input under `inputs/`.

Codecs per chunk: little-endian bytes -> blosc (zstd level 1, byte shuffle, 1 MiB
blocks: on real bf16 activations the best ratio of the fast settings, see
docs/benchmarks.md) -> crc32c, so a flipped bit fails the read. A shard file holds `shard_chunks` chunks plus an
index (itself crc32c-protected); zarr >= 3.1.3 writes every file to a
`*.partial` temporary and renames it, so a kill leaves the old or the new shard,
never a torn one, plus perhaps a stray `*.partial` that `rollback` deletes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.errors import ArrayNotFoundError, GroupNotFoundError, NodeTypeValidationError

from ..errors import StoreError
from . import format as fmt
from .base import Store

# Blosc's default block for level 1 is small; 1 MiB blocks let zstd see whole rows
# of shuffled exponent bytes (ratio 1.26 -> 1.48 on bf16 at the same speed).
COMPRESSION = {"cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 1 << 20}
NOT_FOUND = (ArrayNotFoundError, GroupNotFoundError, NodeTypeValidationError, FileNotFoundError, KeyError)


CRC_DIR = "crc32"  # per input: its chunks' crc32s, raw little-endian uint32, append-only


def init_zarr(path: Path, attrs: dict) -> None:
    """Create the root group with `attrs`, the empty `inputs` group and the checksum directory."""
    root = zarr.open_group(store=zarr.storage.LocalStore(path), mode="w-", attributes=attrs)
    root.create_group("inputs")
    (path / CRC_DIR).mkdir()


class ZarrStore(Store):
    backend = "zarr"

    def __init__(self, path: Path, writable: bool):
        super().__init__(path, writable)
        self._zs = zarr.storage.LocalStore(self.path, read_only=not writable)
        self._arrays: dict[str, zarr.Array] = {}
        self._root = zarr.open_group(store=self._zs, mode="r+" if writable else "r")

    @property
    def reduce_dir(self) -> Path:
        return self.path / "reduce"

    @property
    def applied_dir(self) -> Path:
        return self.path / "applied"

    # A read-only store re-reads metadata on every call, so it can follow a capture
    # still writing; the writer is the only writer and keeps its objects.
    def _group(self) -> zarr.Group:
        if not self.writable:
            self._root = zarr.open_group(store=self._zs, mode="r")
        return self._root

    def _root_attrs(self) -> dict:
        return dict(self._group().attrs.asdict())

    # update_attributes, never attrs.update(): zarr's Attributes inherits update() from
    # MutableMapping, which writes zarr.json once per key, and a kill between two writes
    # left committed_tokens without its chunk_crc32 (found by test_kill_then_resume).
    def _update_root_attrs(self, attrs: dict) -> None:
        self._root.update_attributes(attrs)

    # A directory listing, not Group.array_keys(): that opens every member's metadata,
    # and create_input asks once per input, so 120 inputs cost 6 s of capture start-up.
    # Only arrays live under inputs/, and a member exists once its zarr.json does.
    def _input_names(self) -> list[str]:
        try:
            entries = list(os.scandir(self.path / "inputs"))
        except FileNotFoundError:
            raise StoreError(f"{self.path} has no inputs group: not a coala-stream store") from None
        return sorted(e.name for e in entries if e.is_dir() and os.path.exists(os.path.join(e.path, "zarr.json")))

    def _array(self, name: str, refresh: bool = False) -> zarr.Array:
        if refresh or name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(
                    store=self._zs, path=f"inputs/{name}", mode="r+" if self.writable else "r"
                )
            except NOT_FOUND:
                raise StoreError(
                    f"no input {name!r} in {self.path}; it has {len(self._input_names())} inputs "
                    "(list them with `coala-stream status`)"
                ) from None
            except ValueError as exc:  # a truncated or overwritten zarr.json (JSONDecodeError)
                meta = self.path / "inputs" / name / "zarr.json"
                raise StoreError(
                    f"{meta} is damaged ({type(exc).__name__}: {exc}): input {name!r} cannot be "
                    f"read; restore the file from a copy of the store, or recapture with "
                    f"--overwrite"
                ) from exc
        return self._arrays[name]

    def _input_attrs(self, name: str) -> dict:
        return dict(self._array(name, refresh=not self.writable).attrs.asdict())

    def _set_input_attrs(self, name: str, attrs: dict) -> None:
        self._array(name).update_attributes(attrs)  # one zarr.json write: atomic

    def _new_array(self, name: str, n: int, attrs: dict) -> None:
        ct, shard_chunks = int(self._root.attrs["chunk_tokens"]), int(self._root.attrs["shard_chunks"])
        self._arrays[name] = self._root["inputs"].create_array(
            name,
            shape=(0, n),
            dtype=fmt.stored_dtype(attrs["logical_dtype"]),
            chunks=(ct, n),
            shards=(ct * shard_chunks, n),
            compressors=[BloscCodec(**COMPRESSION), Crc32cCodec()],
            fill_value=0,
            attributes=attrs,
        )

    def _rows(self, name: str) -> int:
        return self._array(name).shape[0]

    def _n(self, name: str) -> int:
        return self._array(name).shape[1]

    def _read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._array(name)[start:stop]

    def _write_rows(self, name: str, start: int, a: np.ndarray) -> None:
        # zarr skips a chunk equal to the fill value, which costs a full compare of every
        # chunk (for uint16, isnan and a masked copy: ~10 % of the writer's CPU); captured
        # chunks are data, and an all-zero one reads back the same either way.
        arr = self._array(name).with_config({"write_empty_chunks": True})
        arr[start : start + len(a)] = a

    def _resize(self, name: str, rows: int) -> None:
        arr = self._array(name)
        arr.resize((rows, arr.shape[1]))

    def _drop_rows(self, name: str, committed: int, rows: int) -> None:
        # Resizing deletes whole shards beyond the new shape, but the shard holding the
        # boundary keeps its uncommitted chunks. Overwrite them with the fill value (zarr
        # then drops them from the shard) so a resumed store is byte-identical to an
        # uninterrupted one. One chunk at a time: memory stays one chunk.
        arr = self._array(name)
        ct, shard_rows = arr.chunks[0], arr.shards[0]
        end = min(rows, -(-committed // shard_rows) * shard_rows)
        for start in range(committed, end, ct):
            stop = min(start + ct, end)
            arr[start:stop] = np.zeros((stop - start, arr.shape[1]), dtype=arr.dtype)
        self._resize(name, committed)

    def stored_bytes(self, name: str) -> int:
        total = 0
        for d, _, files in os.walk(self.path / "inputs" / name):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
        return total

    # Checksums live in a plain file per input, written in place at the chunk's offset:
    # a commit writes 4 bytes per new chunk, and a torn write can only touch entries past
    # the committed count, which readers ignore and rollback truncates.
    def _crc_path(self, name: str) -> Path:
        return self.path / CRC_DIR / name

    def _read_crcs(self, name: str, count: int) -> list[int]:
        try:
            with open(self._crc_path(name), "rb") as f:
                raw = f.read(4 * count)
        except FileNotFoundError:
            raw = b""
        return np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<u4").tolist()

    def _write_crcs(self, name: str, start: int, crcs) -> None:
        if not crcs:
            return
        fd = os.open(self._crc_path(name), os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.pwrite(fd, np.asarray(crcs, dtype="<u4").tobytes(), 4 * start)
        finally:
            os.close(fd)

    def _truncate_crcs(self, name: str, count: int) -> None:
        p = self._crc_path(name)
        if p.exists() and p.stat().st_size > 4 * count:
            os.truncate(p, 4 * count)

    def chunk_bytes(self, name: str, index: int) -> tuple[object, int]:
        shard = index // int(self._root.attrs.get("shard_chunks", 1))
        try:
            size = os.path.getsize(self.path / "inputs" / name / "c" / str(shard) / "0")
        except FileNotFoundError:
            size = 0
        return (name, shard), size

    def _delete_chunks(self, name: str, count: int) -> None:
        per_shard = int(self._root.attrs.get("shard_chunks", 1))
        for shard in range(count // per_shard):  # whole shards only: a shard file is one unit
            (self.path / "inputs" / name / "c" / str(shard) / "0").unlink(missing_ok=True)

    def _remove_partials(self) -> int:
        # Only zarr's own temporaries: the root's and those under inputs/. reduce/ is
        # another program's directory (its temporary files are its business).
        found = list(self.path.glob("*.partial")) + list((self.path / "inputs").rglob("*.partial"))
        for p in found:
            p.unlink(missing_ok=True)
        return len(found)
