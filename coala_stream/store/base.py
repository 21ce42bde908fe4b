"""`Store`: the reader and writer logic both backends share.

A backend (`_zarr.ZarrStore`, `_hdf5.Hdf5Store`) supplies a few primitives on
named 2-D arrays and their attributes; everything that defines the format (checksums,
fingerprints, chunk arithmetic here; the commit protocol in `commit.py`, a mixin of
`Store`) lives in these two modules once.

Format 2 keeps each input's chunk checksums in an append-only uint32 array beside
its data (`_read_crcs` / `_write_crcs`), so a commit writes the new chunks' checksums
and one attribute (`committed_tokens`): its cost is the new chunks', not all of them.
Format 1 stores (a JSON list in the attributes) are read as before.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from functools import cached_property
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, StoreError, UsageError
from ..signals import deferring
from . import format as fmt
from .commit import CommitProtocol
from .format import InputInfo


class Store(CommitProtocol, ABC):
    """An activation store opened by `open_store` or made by `create_store`.

    Readers trust only each input's `committed_tokens` and `chunk_crc32`
    attributes, never the array shape (a killed write can leave rows beyond the
    commit). Reading one chunk holds one chunk in memory.
    """

    backend = ""

    def __init__(self, path: Path, writable: bool):
        self.path = Path(path)
        self.writable = writable
        # one writer per input at a time: zarr rewrites a whole shard per chunk write
        self._locks: dict[str, threading.Lock] = {}
        # A writer is the only one changing the store: it keeps every input's committed state
        # in memory, so writes and commits never re-read the checksums (readers always do).
        self._committed: dict[str, InputInfo] = {}

    # -- backend primitives: named (rows x n) arrays of stored values, and JSON attributes --
    @property
    @abstractmethod
    def reduce_dir(self) -> Path:
        """Where reduce writes `<name>.safetensors` (not a node of the store)."""

    @property
    @abstractmethod
    def applied_dir(self) -> Path:
        """Where a propagating capture keeps the factors it applied (`coala_stream.applied`)."""

    @abstractmethod
    def _root_attrs(self) -> dict: ...
    @abstractmethod
    def _update_root_attrs(self, attrs: dict) -> None:
        """Merge `attrs` into the root attributes in one write."""
    @abstractmethod
    def _input_names(self) -> list[str]: ...
    @abstractmethod
    def _input_attrs(self, name: str) -> dict:
        """Attributes of input `name`; StoreError if there is no such input."""
    @abstractmethod
    def _set_input_attrs(self, name: str, attrs: dict) -> None:
        """Merge `attrs` into the input's attributes, atomically where the backend can."""
    @abstractmethod
    def _new_array(self, name: str, n: int, attrs: dict) -> None: ...
    @abstractmethod
    def _rows(self, name: str) -> int:
        """Rows the array has (committed or not)."""
    @abstractmethod
    def _n(self, name: str) -> int: ...
    @abstractmethod
    def _read_rows(self, name: str, start: int, stop: int) -> np.ndarray: ...
    @abstractmethod
    def _write_rows(self, name: str, start: int, a: np.ndarray) -> None: ...
    @abstractmethod
    def _resize(self, name: str, rows: int) -> None: ...
    @abstractmethod
    def stored_bytes(self, name: str) -> int:
        """Bytes input `name` takes on disk (compressed data and its metadata)."""

    @abstractmethod
    def _read_crcs(self, name: str, count: int) -> list[int]:
        """The first `count` chunk checksums of `name` (format 2; the array may hold more)."""
    @abstractmethod
    def _write_crcs(self, name: str, start: int, crcs: Sequence[int]) -> None:
        """Write checksums of chunks start, start+1, ... (growing the array as needed)."""
    @abstractmethod
    def _truncate_crcs(self, name: str, count: int) -> None: ...
    @abstractmethod
    def chunk_bytes(self, name: str, index: int) -> tuple[object, int]:
        """(key, bytes on disk) of the file or chunk holding chunk `index` (its shard for zarr):
        what writers add up for the size of a growing store without walking every file."""

    @cached_property
    def format_version(self) -> int:
        return int(self._root_attrs().get("format_version", 1))

    def _remove_partials(self) -> int:
        """Delete temporaries a killed write left; how many. Backends without any: 0."""
        return 0

    def _remove_half_created(self) -> list[str]:
        """Delete inputs whose creation a kill interrupted; their names."""
        return []

    def _flush(self) -> None:
        """Push buffered writes to the operating system (a no-op where writes are unbuffered)."""

    def close(self) -> None:
        """Release the backend's handles; the store is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} ({len(self.inputs)} inputs)>"

    # -- reader --------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """Root attributes (a fresh copy): format, model, calibration, dtype, chunk_tokens, capture, uuid."""
        return self._root_attrs()

    @property
    def chunk_tokens(self) -> int:
        return int(self.attrs["chunk_tokens"])

    @property
    def inputs(self) -> list[str]:
        """Input names in model order (the order capture created them)."""
        names = self._input_names()
        return sorted(names, key=lambda nm: (self._input_attrs(nm).get("order", 0), nm))

    def input(self, name: str) -> InputInfo:
        """Committed state of one input (fresh from disk for readers); StoreError if there is no such input."""
        if name in self._committed:
            return self._committed[name]
        a = self._input_attrs(name)
        root = self._root_attrs()
        tokens, ct = int(a.get("committed_tokens", 0)), int(root["chunk_tokens"])
        count = fmt.num_chunks(tokens, ct)
        if int(root.get("format_version", 1)) >= 2:
            crcs = self._read_crcs(name, count)
        else:
            crcs = [int(c) for c in a.get("chunk_crc32", [])]
        if len(crcs) != count:
            raise StoreError(
                f"input {name!r}: committed_tokens={tokens} needs {count} "
                f"chunk checksums at chunk_tokens={ct}, found {len(crcs)}; the store is inconsistent "
                "(written by another tool?): recapture it with --overwrite"
            )
        info = InputInfo(
            name=name,
            consumers=list(a.get("consumers", [])),
            n=self._n(name),
            tokens=tokens,
            dtype=fmt.torch_dtype(a.get("logical_dtype", root["dtype"])),
            chunk_tokens=ct,
            num_chunks=len(crcs),
            chunk_crc32=crcs,
            pair=bool(a.get("pair", False)),
            outputs=None if a.get("pair_outputs") is None else tuple(a["pair_outputs"]),
            dropped=int(a.get("dropped_chunks", 0)),
        )
        if self.writable:
            self._committed[name] = info
        return info

    def read_chunk(self, name: str, i: int) -> torch.Tensor:
        """Committed chunk i of `name`: (rows x n) tensor in the logical dtype, bit-exact.

        rows = chunk_tokens except for the last chunk of a finished capture.
        DataError naming input and chunk on a checksum or decode failure.
        """
        return self._read_chunk(self.input(name), i)

    def iter_chunks(self, name: str, start: int = 0) -> Iterator[torch.Tensor]:
        """Lazily yield read_chunk(name, i) for committed chunks i >= start (one in memory at a time)."""
        info = self.input(name)
        for i in range(start, info.num_chunks):
            yield self._read_chunk(info, i)

    def _read_chunk(self, info: InputInfo, i: int) -> torch.Tensor:
        if not 0 <= i < info.num_chunks:
            raise UsageError(
                f"input {info.name!r} has {info.num_chunks} committed chunks (0..{info.num_chunks - 1}), "
                f"chunk {i} was asked for"
            )
        start, stop = info.chunk_rows(i)
        where = f"input {info.name!r} chunk {i} (rows {start}:{stop}) of {self.path}"
        if i < info.dropped:
            raise StoreError(f"{where} was deleted after reduce folded it (capture "
                             f"--drop-activations): its reduce result is all that is left; "
                             f"recapture to fold it again")
        try:
            a = self._read_rows(info.name, start, stop)
        except MemoryError:
            raise
        except Exception as exc:  # codec checksum / decompression / truncated file: all corruption
            raise DataError(
                f"{where} cannot be decoded ({type(exc).__name__}: {exc}); the data on disk is "
                "corrupt: restore the store from a copy or recapture"
            ) from exc
        got = fmt.crc32(a)
        if got != info.chunk_crc32[i]:
            raise DataError(
                f"{where}: crc32 {got:#010x} does not match the committed {info.chunk_crc32[i]:#010x}; "
                "the data on disk is corrupt: restore the store from a copy or recapture"
            )
        return fmt.from_stored(a, str(info.dtype).removeprefix("torch."))

    def fingerprint(self, name: str, upto: int | None = None,
                    ahead: Sequence[int] | None = None) -> str:
        """Identity of the first `upto` committed chunks of `name` (all if None): what checkpoints match.

        Built from the store uuid, n, dtype, chunk_tokens and the chunks' crc32s; reading no data.
        ``ahead``: every chunk's crc32 once whole chunks not yet committed are (a reduce result
        written before the commit of what it folded: `commit_folded`); the fingerprint the
        store will give then.
        """
        info = self.input(name)
        if ahead is not None:
            crcs = [int(c) & 0xFFFFFFFF for c in ahead]
            if crcs[:info.num_chunks] != info.chunk_crc32:
                raise StoreError(f"input {name!r}: the checksums given for a later commit change "
                                 f"its {info.num_chunks} committed chunks")
            info = replace(info, tokens=len(crcs) * info.chunk_tokens, num_chunks=len(crcs),
                           chunk_crc32=crcs)
        upto = info.num_chunks if upto is None else int(upto)
        if not 0 <= upto <= info.num_chunks:
            raise StoreError(
                f"input {name!r} has {info.num_chunks} committed chunks, a fingerprint of the first "
                f"{upto} was asked for: the checkpoint was made from more data than this store holds"
            )
        return fmt.fingerprint(str(self._root_attrs()["uuid"]), info, upto)

    # -- writer ----------------------------------------------------------------
    def _need_writable(self, what: str) -> None:
        if not self.writable:
            raise StoreError(
                f"{what}: the store {self.path} was opened read-only; use open_store(path, mode='r+')"
            )
        if self.format_version < fmt.FORMAT_VERSION:
            raise StoreError(
                f"{self.path} was made by an older coala-stream ({self.attrs.get('tool_version')}, "
                f"store format {self.format_version}); this version reads it but writes only format "
                f"{fmt.FORMAT_VERSION}: finish that capture with the older version, or recapture "
                "with --overwrite")

    @deferring
    def create_input(self, name: str, n: int, consumers: Sequence[str],
                     pair: bool = False, outputs: Sequence[int] | None = None) -> InputInfo:
        """Add an empty (0 x n) input read by `consumers`; returns it unchanged if it exists alike.

        ``pair``: the rows are [Xh | X] (n = 2 x the consumers' input features), see
        `InputInfo.pair`; with ``outputs`` (the consumers' output widths) a narrow pair
        [Xh | X W_g^T] (n = features + sum(outputs), `InputInfo.outputs`). Idempotent so that
        a resumed capture can call it again; StoreError if an input of that name exists with
        another n, consumers or pairing.
        """
        self._need_writable("create_input")
        consumers = [str(c) for c in consumers]
        if not name or "/" in name or name.startswith("__") or name in (".", ".."):
            raise UsageError(f"input name {name!r} is not usable as a store node: use the module path")
        outputs = None if outputs is None else tuple(int(m) for m in outputs)
        if outputs is not None:
            pair = True
            if len(outputs) != len(consumers) or min(outputs) < 1 or sum(outputs) >= n:
                raise UsageError(f"input {name!r}: a narrow pair needs one positive output width "
                                 f"per consumer, together below n={n}; got {list(outputs)}")
        elif pair and n % 2:
            raise UsageError(f"input {name!r}: a pair input holds [Xh | X], so n must be even, got {n}")
        if name in self._input_names():
            info = self.input(name)
            if (info.n != n or info.consumers != consumers or info.pair != bool(pair)
                    or info.outputs != outputs):
                raise StoreError(
                    f"input {name!r} exists with n={info.n}, consumers={info.consumers}, "
                    f"pair={info.pair}, outputs={info.outputs}; asked for n={n}, "
                    f"consumers={consumers}, pair={bool(pair)}, outputs={outputs}: "
                    "the store was captured from another model or "
                    "settings; capture again with --overwrite"
                )
            return info
        dtype = self._root_attrs()["dtype"]
        self._new_array(name, int(n), {
            "consumers": consumers, "logical_dtype": dtype, "order": len(self._input_names()),
            "committed_tokens": 0, **({"pair": True} if pair else {}),
            **({"pair_outputs": list(outputs)} if outputs is not None else {}),
        })
        return self.input(name)

    @deferring
    def drop_activations(self, name: str) -> int:
        """Delete the data of input ``name``'s committed chunks, keeping their checksums and
        commit record (what reduce results are matched against); returns the chunks dropped.

        The record (``dropped_chunks``) is written first, so a kill between the two leaves
        chunks that read as dropped, never dropped chunks that read as data. Chunks
        committed later are kept. StoreError where the backend cannot free the space.
        """
        self._need_writable("drop_activations")
        info = self.input(name)
        self._set_input_attrs(name, {"dropped_chunks": info.num_chunks})
        self._delete_chunks(name, info.num_chunks)
        self._committed.pop(name, None)
        return info.num_chunks

    def _delete_chunks(self, name: str, count: int) -> None:
        """Free the space of chunks [0, count) of ``name``."""
        raise StoreError(f"{self.path}: the {self.backend} backend cannot free the space of single "
                         f"chunks; use a zarr store")

    @deferring
    def write_chunk(self, name: str, index: int, tensor: torch.Tensor) -> int:
        """Write chunk `index` (rows x n, logical dtype, 0 < rows <= chunk_tokens) of `name`.

        Not visible to readers until `commit`. Returns the crc32 of the stored bytes, which
        the caller passes back to `commit`. Committed chunks are immutable (StoreError).
        """
        self._need_writable("write_chunk")
        info = self.input(name)
        self._check_chunk(info, index, tensor)
        a = fmt.to_stored(tensor)
        start = index * info.chunk_tokens
        with self._locks.setdefault(name, threading.Lock()):
            if start + len(a) > self._rows(name):
                # Metadata first: rows beyond the commit are not data. Growing a shard at a
                # time, not a chunk, saves a metadata rewrite per chunk (zarr: 1.7x the
                # writer's throughput); commit(complete=True) trims the shape to the tokens.
                self._resize(name, self._grown_rows(start + len(a)))
            self._write_rows(name, start, a)
        return fmt.crc32(a)

    def _grown_rows(self, rows: int) -> int:
        step = self.chunk_tokens * int(self.attrs.get("shard_chunks", 1))
        return -(-rows // step) * step

    def _check_chunk(self, info: InputInfo, index: int, t: torch.Tensor) -> None:
        if t.dim() != 2 or t.shape[1] != info.n or not 0 < t.shape[0] <= info.chunk_tokens:
            raise UsageError(
                f"chunk for input {info.name!r} must be (rows x {info.n}) with 0 < rows <= "
                f"{info.chunk_tokens}, got shape {tuple(t.shape)}"
            )
        if t.dtype != info.dtype:
            raise UsageError(f"chunk for input {info.name!r} must be {info.dtype}, got {t.dtype}")
        if index < info.num_chunks:
            raise StoreError(
                f"chunk {index} of input {info.name!r} is already committed ({info.num_chunks} are) "
                "and committed chunks never change; continue at chunk "
                f"{info.num_chunks} (after rollback() on resume)"
            )
