"""Chunk buffers and the writer threads that compress and commit them.

Memory beyond the model: one chunk buffer per input (``chunk_tokens x sum(n)``
in the model dtype) plus at most `QUEUE_CHUNKS` chunks waiting to be
dispatched and `WRITER_QUEUE` waiting for each writer, whatever the number of samples.
"""

from __future__ import annotations

import queue
import threading

import torch

from .. import signals
from ..errors import CoalaError, disk_full

QUEUE_CHUNKS = 4  # chunks waiting to be dispatched; bounds memory beyond the chunk buffers
WRITER_QUEUE = 2  # ... and waiting for each writer thread


class ChunkBuffer:
    """Collects one input's rows into (chunk_tokens x n) CPU tensors."""

    def __init__(self, rows: int, n: int, dtype: torch.dtype, index: int):
        self.rows, self.n, self.dtype, self.index = rows, n, dtype, index
        self.buf: torch.Tensor | None = None
        self.fill = 0

    def add(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Copy ``x`` (k x n, any device); return the chunks it completed as (index, tensor)."""
        done, pos = [], 0
        while pos < x.shape[0]:
            if self.buf is None:
                self.buf = torch.empty(self.rows, self.n, dtype=self.dtype)
            take = min(x.shape[0] - pos, self.rows - self.fill)
            self.buf[self.fill:self.fill + take].copy_(x[pos:pos + take])
            pos += take
            self.fill += take
            if self.fill == self.rows:
                done.append((self.index, self.buf))
                self.index, self.buf, self.fill = self.index + 1, None, 0
        return done

    def flush(self) -> tuple[int, torch.Tensor] | None:
        """The last, partial chunk, if any."""
        if not self.fill:
            return None
        out = (self.index, self.buf[:self.fill])
        self.index, self.buf, self.fill = self.index + 1, None, 0
        return out


def assign_writers(widths: dict[str, int], writers: int) -> dict[str, int]:
    """Input name -> writer thread, balancing the bytes per chunk (every input gets a
    chunk per chunk of tokens, so its width is its share): widest first, to the least
    loaded thread."""
    load = [0] * writers
    owner = {}
    for name in sorted(widths, key=lambda nm: (-widths[nm], nm)):
        k = load.index(min(load))
        owner[name] = k
        load[k] += widths[name]
    return owner


class ChunkWriter:
    """Writer threads: ("chunk", name, index, tensor) and ("commit", samples, tokens,
    complete) items go into one bounded queue, and a dispatcher thread hands them on
    to a bounded queue per writer thread. An input's chunks always go to the same
    thread, so they are written in order; a commit goes to every thread and is a
    barrier: the last thread to reach it commits while the others wait, so it sees
    every chunk queued before it and no later one. The producer only ever puts one
    item into one queue, so a signal (raised in the main thread) cannot leave a
    commit queued for some writers and not others, which would hang the barrier.
    After an error the threads keep draining their queues (so the producer never
    blocks) and `check` re-raises the error in the producer's thread."""

    def __init__(self, store, crcs: dict[str, list[int]], widths: dict[str, int], itemsize: int,
                 writers: int = 1, maxsize: int = QUEUE_CHUNKS):
        self.store, self.crcs = store, crcs
        self.row_bytes = sum(widths.values()) * itemsize
        self.owner = assign_writers(widths, writers)
        self.inbox: queue.Queue = queue.Queue(maxsize)
        self.queues = [queue.Queue(WRITER_QUEUE) for _ in range(writers)]
        self.barrier = threading.Barrier(writers, action=self._commit)
        self.pending = None
        self.error: BaseException | None = None
        self.raw = [0] * writers  # bytes written by this run, per thread (no shared counter)
        self.committed_raw = 0  # whole store as of the last commit: uncompressed bytes
        # ... and bytes on disk: the store's size before this run plus what each thread's
        # writes added, kept per file so a commit never walks every chunk file
        self.base_stored = sum(store.stored_bytes(n) for n in crcs)
        self.stored_bytes = self.base_stored
        self._file_bytes: dict = {}
        self.added = [0] * writers
        self.samples_committed = None
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True,
                                         name=f"coala-capture-writer-{k}") for k in range(writers)]
        self.threads.append(threading.Thread(target=self._dispatch, daemon=True,
                                             name="coala-capture-dispatch"))
        for t in self.threads:
            t.start()

    @property
    def raw_bytes(self) -> int:
        return sum(self.raw)

    def put(self, item) -> None:
        self.check()
        self.inbox.put(item)

    def check(self) -> None:
        if self.error is not None:
            raise translate_write_error(self.error, self.store, self.samples_committed)

    def close(self) -> None:
        """Finish the queued items, stop the threads, re-raise an error if any (idempotent)."""
        if any(t.is_alive() for t in self.threads):
            self.inbox.put(None)
            for t in self.threads:
                t.join()
            self.barrier = None  # its action refers back to self: no cycle left for the GC
        self.check()

    def _dispatch(self) -> None:
        while True:
            item = self.inbox.get()
            if item is not None and item[0] == "chunk":
                self.queues[self.owner[item[1]]].put(item)
                continue
            for q in self.queues:  # a commit, or the end
                q.put(item)
            if item is None:
                return

    def _run(self, k: int) -> None:
        q = self.queues[k]
        while (item := q.get()) is not None:
            if item[0] == "commit":
                self.pending = item  # every thread sets the same item
                self.barrier.wait()  # runs _commit once all threads are here
                continue
            if self.error is not None:
                continue
            try:
                _, name, index, tensor = item
                if index != len(self.crcs[name]):
                    raise RuntimeError(f"chunk {index} of {name} out of order")
                key, before = self.store.chunk_bytes(name, index)
                self._file_bytes.setdefault(key, before)
                self.crcs[name].append(self.store.write_chunk(name, index, tensor))
                self.raw[k] += tensor.numel() * tensor.element_size()
                _, after = self.store.chunk_bytes(name, index)
                self.added[k] += after - self._file_bytes[key]
                self._file_bytes[key] = after
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self.error = exc

    def _commit(self) -> None:
        # Barrier action: every writer waits, so the chunk lists are complete and still.
        # After SIGINT/SIGTERM no commit runs: the producer may be far ahead, and the job
        # should stop at once (the chunks written since the last commit are rolled back).
        if self.error is not None or signals.requested():
            return
        try:
            _, samples, tokens, complete = self.pending
            self.store.commit(samples, {name: (tokens, c) for name, c in self.crcs.items()},
                              complete=complete)
            self.samples_committed = samples
            self.committed_raw = tokens * self.row_bytes
            self.stored_bytes = self.base_stored + sum(self.added)
        except BaseException as exc:  # noqa: BLE001 - a raising action would break the barrier
            self.error = exc


def translate_write_error(exc: BaseException, store, committed) -> BaseException:
    where = f"{getattr(store, 'path', 'the store')}"
    done = "" if committed is None else f" (committed: {committed} samples)"
    if isinstance(exc, CoalaError):  # already says what to do
        return exc
    if disk_full(exc):  # h5py's RuntimeError says errno = 28 in its text only
        err = CoalaError(f"the disk is full while writing {where}{done}: nothing committed is "
                         f"lost; free some space and rerun the same command to resume")
    elif isinstance(exc, OSError):
        err = CoalaError(f"writing {where} failed: {exc}{done}; nothing committed is lost, "
                         f"rerun the same command to resume")
    else:
        return exc
    err.__cause__ = exc
    return err
