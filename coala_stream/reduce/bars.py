"""Reduce's progress bars, in bytes of stored activations."""

from __future__ import annotations

import torch


def chunk_bytes(info, i: int) -> int:
    a, b = info.chunk_rows(i)
    return (b - a) * info.n * torch.empty(0, dtype=info.dtype).element_size()


class Bars:
    """tqdm bars in bytes of stored activations: overall (this run's work) and the current input.

    ``disable=None`` when enabled: bars show on a terminal only, not in logs.
    """

    def __init__(self, store, names, enabled: bool):
        from tqdm.auto import tqdm

        self._tqdm, self._disable = tqdm, None if enabled else True
        total = sum(input_bytes(store.input(n)) for n in names)
        self.overall = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=f"reduce {len(names)} inputs", position=0, disable=self._disable)
        self.current = None
        self._count, self._inputs = 0, len(names)

    def begin(self, job, per_input: bool = True) -> None:
        """A new input: what earlier runs folded leaves the overall total; a bar of its own."""
        self._count += 1
        last = job.info.num_chunks if job.action == "skipped" else job.start
        done = sum(chunk_bytes(job.info, i) for i in range(last))
        self.overall.total -= done
        self.overall.refresh()
        if self.current is not None:
            self.current.close()
            self.current = None
        if per_input and job.action != "skipped":
            self.current = self._tqdm(
                total=input_bytes(job.info), initial=done, unit="B", unit_scale=True,
                unit_divisor=1000, desc=f"({self._count}/{self._inputs}) {job.name}", position=1,
                leave=False, disable=self._disable)

    def update(self, nbytes: int) -> None:
        self.overall.update(nbytes)
        if self.current is not None:
            self.current.update(nbytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.current is not None:
            self.current.close()
        self.overall.close()


def input_bytes(info) -> int:
    return info.tokens * info.n * torch.empty(0, dtype=info.dtype).element_size()
