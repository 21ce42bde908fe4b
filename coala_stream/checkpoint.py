"""Atomic files, the safetensors + JSON state format, and the store lock.

I/O only, no linear algebra. Three pieces:

- ``atomic_write(path, data)``: a temporary file in the same directory,
  flush + fsync, ``os.replace`` onto the final name, fsync of the directory.
  A reader (or a rerun after ``kill -9``) sees the old file or the new one,
  never a torn one; after the directory fsync the new name survives a power
  cut too.
- ``save_state(path, tensors, meta)`` / ``load_state(path)``: one safetensors
  file whose ``__metadata__["coala"]`` holds ``meta`` as JSON. This is the
  format of ``reduce/<name>.safetensors`` (docs/design.md, "Reduce output"):
  the same file is the checkpoint (``complete: false``) and the result.
- ``StoreLock``: an ``O_CREAT | O_EXCL`` lock file holding pid, hostname,
  start time and a random token. The holder refreshes its mtime (a heartbeat
  thread). A lock is stale, and taken over with a one-line notice on stderr, when its pid is
  dead on this host or its heartbeat is older than ``stale_after`` seconds
  (the only test possible for a holder on another host).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import sys
import time
from pathlib import Path

import torch

from .errors import DataError, LockedError, UsageError, WriteError, write_error

META_KEY = "coala"
REDUCE_LOCK = "lock"
STALE_AFTER = 120.0  # seconds without a heartbeat after which a lock on another host is stale  # in the store's reduce directory
TEMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<random>" in the target directory


# -- atomic files --------------------------------------------------------------


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    Temporary file in the same directory (same filesystem, so the rename is
    atomic), flush + fsync, ``os.replace``, fsync of the directory. On any
    error the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{secrets.token_hex(6)}")
    try:
        # os.open rather than mkstemp: mode 0o666 minus the umask, like any file (mkstemp: 0o600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:  # a read-only location, no permission, no space for an inode
        raise write_error(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(exc, path) from exc  # the old file at path is intact
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename or creation inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted ``atomic_write`` calls in ``directory``.

    Only safe while holding the lock of whatever writes there. Returns the
    removed paths.
    """
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and TEMP_MARK in p.name and p.is_file():
                _unlink(p)
                removed.append(p)
    return removed


# -- state files: safetensors + JSON metadata -------------------------------------


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and ``meta`` atomically as one safetensors file.

    Tensors are moved to CPU and made contiguous; ``meta`` must be
    JSON-serialisable and is stored as JSON under ``__metadata__["coala"]``.
    Cost: one copy of the tensors in host memory plus the file write.
    """
    from safetensors.torch import save

    try:
        blob = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"meta: expected a JSON-serialisable dict, got {meta!r} ({exc})") from exc
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, save(cpu, metadata={META_KEY: blob}))


# what a damaged state file's message tells the user to do; a caller whose command has
# --restart (reduce) says so instead
REDO = "delete it and rerun the same command"


def load_state(path: str | os.PathLike, fix: str = REDO) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by ``save_state``: (tensors on CPU, meta dict).

    Raises DataError naming the file and ``fix`` when it is not a readable state file
    (nothing ``save_state`` writes can be torn, so this means someone else
    wrote or damaged it).
    """
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        meta = json.loads(_header_metadata(data).get(META_KEY) or "{}")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors / json raise their own types; all mean "unreadable"
        raise DataError(
            f"state file {path} is unreadable ({exc}); {fix}"
        ) from exc
    if not isinstance(meta, dict):
        raise DataError(f"state file {path}: metadata '{META_KEY}' is not a JSON object")
    return tensors, meta


def load_meta(path: str | os.PathLike, fix: str = REDO) -> dict:
    """The meta dict of a ``save_state`` file, reading only its header (cheap for big tensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError(f"header size {size} is implausible")
            header = json.loads(f.read(size))
            meta = json.loads(header.get("__metadata__", {}).get(META_KEY) or "{}")
            _check_length(header, 8 + size, os.fstat(f.fileno()).st_size)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DataError(
            f"state file {path} is unreadable ({exc}); {fix}"
        ) from exc
    if not isinstance(meta, dict):
        raise DataError(f"state file {path}: metadata '{META_KEY}' is not a JSON object")
    return meta


def _check_length(header: dict, start: int, length: int) -> None:
    """ValueError unless the file is exactly as long as its header's tensors say: a file cut
    short (or grown) is found from its header alone, without reading the tensors."""
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    if start + max(ends, default=0) != length:
        raise ValueError(f"the file is {length} bytes, its header says {start + max(ends, default=0)}")


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` dict of a safetensors blob (8-byte length + JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


# -- the lock ---------------------------------------------------------------------


class StoreLock:
    """An exclusive lock file (``O_CREAT | O_EXCL``) with a heartbeat.

    Use as a context manager::

        with StoreLock(store.reduce_dir / "lock", what="reduce"):
            ...

    The file holds JSON: pid, hostname, started (unix time), token. While
    held, a daemon thread touches the file every ``heartbeat`` seconds. Another
    process refuses with LockedError naming the holder, unless the lock is
    stale: its pid is gone on this same host, or its mtime is older than
    ``stale_after`` seconds. A stale lock is taken over with a one-line notice on stderr.

    If the file is removed or replaced by someone else while held, ``lost``
    becomes True (checked by ``check()``), so a driver stops instead of two
    writers running.
    """

    def __init__(self, path, *, what: str = "process", heartbeat: float = 10.0,
                 stale_after: float = None):
        stale_after = STALE_AFTER if stale_after is None else stale_after
        if not 0 < heartbeat < stale_after:
            raise UsageError(
                f"heartbeat: expected 0 < heartbeat < stale_after, got {heartbeat} and {stale_after}"
            )
        self.path = Path(path)
        self.what = what
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.token = secrets.token_hex(8)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # public

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a few rounds: a racing process may take over between our steps
            if self._try_create():
                self._remove_asides()
                self._start_heartbeat()
                return self
            holder = read_lock(self.path)
            if holder is None:  # vanished between our create and our read: try again
                continue
            reason = self._stale_reason(holder)
            if reason is None:
                raise LockedError(self._locked_message(holder))
            if self._take_over(holder):  # one plain line: a log reader needs no Python warning
                print(f"coala-stream: note: taking over the stale {self.what} lock {self.path} "
                      f"(held by {describe_holder(holder)}: {reason})", file=sys.stderr)
        raise LockedError(f"could not take the lock {self.path}: other processes keep racing for it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = read_lock(self.path)
        if holder is not None and holder.get("token") == self.token:
            _unlink(self.path)

    def check(self) -> None:
        """Raise LockedError if the lock was taken from us (file removed or replaced)."""
        if self.lost:
            raise LockedError(
                f"the lock {self.path} was removed or taken over by another process while "
                f"this {self.what} held it; stopping so two writers never run at once"
            )

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # internals

    def _try_create(self) -> bool:
        record = {"pid": os.getpid(), "hostname": socket.gethostname(),
                  "started": time.time(), "token": self.token, "what": self.what}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path.parent)
        return True

    def _stale_reason(self, holder: dict) -> str | None:
        return stale_reason(holder, self.stale_after)

    def _take_over(self, holder: dict) -> bool:
        """Remove the stale lock if it is still the one we judged; True if removed.

        Rename-then-verify, so two processes taking over at once never delete a
        fresh lock: the loser finds another token in what it renamed and links
        it back.
        """
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_lock(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            try:
                os.link(aside, self.path)  # put the live lock back (fails if a new one exists)
            except OSError:
                pass
            _unlink(aside)
            return False
        _unlink(aside)
        return True

    def _remove_asides(self) -> None:
        """Delete stale locks set aside by takeovers that were killed half-way (we hold the lock now)."""
        for p in self.path.parent.glob(f"{self.path.name}.stale-*"):
            _unlink(p)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"{self.what}-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = read_lock(self.path)
            if holder is None or holder.get("token") != self.token:
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:
                self.lost = True
                return

    def _locked_message(self, holder: dict) -> str:
        return (
            f"another {holder.get('what', 'process')} holds the lock {self.path} "
            f"({describe_holder(holder)}); wait for it to finish. If that process is gone, "
            f"the lock is taken over automatically once it is stale (its pid is dead on this "
            f"host, or no heartbeat for {self.stale_after:.0f} s), or remove the file by hand"
        )


def stale_reason(holder: dict, stale_after: float = STALE_AFTER) -> str | None:
    """Why a lock record is stale (its pid is dead on this host, or no heartbeat for
    ``stale_after`` seconds), None while its holder counts as alive. The one test every
    lock user and `status` apply."""
    if holder.get("hostname") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return f"process {holder['pid']} is no longer running"
    age = holder.get("_age")
    if age is not None and age > stale_after:
        return f"no heartbeat for {age:.0f} s (limit {stale_after:.0f} s)"
    return None


def live_holder(path, stale_after: float = STALE_AFTER) -> dict | None:
    """The record of a live holder of the lock at ``path``; None if free or stale."""
    holder = read_lock(path)
    if holder is None or stale_reason(holder, stale_after) is not None:
        return None
    return holder


def read_lock(path) -> dict | None:
    """The lock record (plus ``_age``: seconds since its last heartbeat), or None if absent.

    An unreadable record (a holder killed between create and write) reads as
    ``{}`` with its age, so it turns stale on age alone.
    """
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:  # bytes, not text: binary garbage (a damaged disk, a stray write) is unreadable too
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            record = {}
    except ValueError:  # UnicodeDecodeError is one
        record = {}
    record["_age"] = max(0.0, age)
    return record


def describe_holder(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('hostname', '?')}, started {when}, "
            f"last heartbeat {holder.get('_age', 0):.0f} s ago")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
