"""`ChunkPrefetcher`: chunks of one input read (and decompressed, checksummed) in the background."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch


class ChunkPrefetcher:
    """Chunks ``start .. stop-1`` of one input, in order, read up to ``depth`` ahead.

    ``threads`` background threads call ``read(i)`` (read + decompress +
    checksum); with ``pin`` the result is copied to pinned memory there, so
    the device copy can be non-blocking. An error in a read surfaces when
    its chunk is reached, in order. Memory: at most ``depth`` chunks pending.
    """

    def __init__(self, read, start: int, stop: int, *, depth: int = 4, threads: int = 2,
                 pin: bool = False):
        self._read, self._pin = read, pin
        self._next, self._stop = start, stop
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max(1, min(threads, self._depth)),
                                        thread_name_prefix="coala-read")
        self._pending: deque = deque()
        self._fill()

    def _load(self, i: int) -> torch.Tensor:
        t = self._read(i)
        return t.pin_memory() if self._pin else t

    def _fill(self) -> None:
        while len(self._pending) < self._depth and self._next < self._stop:
            self._pending.append((self._next, self._pool.submit(self._load, self._next)))
            self._next += 1

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, torch.Tensor]:
        if not self._pending:
            raise StopIteration
        index, future = self._pending.popleft()
        tensor = future.result()
        self._fill()
        return index, tensor

    def take(self, count: int) -> list[tuple[int, torch.Tensor]]:
        return [next(self) for _ in range(count)]

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
