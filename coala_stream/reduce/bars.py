"""Reduce's progress bars, in bytes of stored activations."""

from __future__ import annotations

import math

import torch

from ..progress import bar


def chunk_bytes(info, i: int) -> int:
    a, b = info.chunk_rows(i)
    return (b - a) * info.n * torch.empty(0, dtype=info.dtype).element_size()


class Bars:
    """Progress in bytes of stored activations: overall (this run's work) and the current input.

    `progress.bar`: tqdm bars on a terminal; in a log, plain rate-bounded lines of the
    overall bar only (a line per input would flood a log of hundreds of inputs).
    """

    def __init__(self, store, names, enabled: bool):
        self._enabled = enabled
        total = sum(input_bytes(store.input(n)) for n in names)
        self.overall = bar(total, f"reduce {len(names)} inputs", "B", enabled=enabled,
                           unit_scale=True, unit_divisor=1000, position=0)
        self.current = None
        self._count, self._inputs = 0, len(names)

    def begin(self, job, per_input: bool = True) -> None:
        """A new input: what earlier runs folded leaves the overall total; a bar of its own."""
        self._count += 1
        last = job.info.num_chunks if job.action == "skipped" else job.start
        done = sum(chunk_bytes(job.info, i) for i in range(last))
        self.overall.total -= done
        self.overall.set_postfix_str(f"input {self._count}/{self._inputs} {job.name}", refresh=False)
        self.overall.refresh()
        if self.current is not None:
            self.current.close()
            self.current = None
        if per_input and job.action != "skipped":
            self.current = bar(input_bytes(job.info), f"({self._count}/{self._inputs}) {job.name}",
                               "B", enabled=self._enabled, initial=done, unit_scale=True,
                               unit_divisor=1000, position=1, leave=False, interval=math.inf)

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
