"""A block-by-block capture's rows folded as they are made, never written (issue 25).

When the capture drops an input's activations once they are reduced (``--drop-activations``:
compress's default, and a plain ``--sequential`` capture at a calibration size whose
activations would not fit on disk), writing them compressed to the store, reading them back
and deleting them is work for nothing. `GroupFold` folds the chunks the capture produces in the groups
reduce would fold them in (`reduce.plan_groups`: boundaries at multiples of
``group_chunks``), with reduce's kernel on the same tensors, so R is bit-identical to the
one reduce makes from the store. The store gets what a dropped input holds: every chunk's
checksum and commit record, marked dropped, and reduce's own result file; status, solve,
reduce and the final commit read it as any dropped input.

Crash safety, per fold group: (1) the result file, written atomically, holds next_chunk,
the fingerprint the store will have once the group is committed, and every chunk's
checksum (``FOLDED``); (2) `Store.commit_folded` commits them. `open` rolls a kill between
the two forward; a kill before (1) loses the rows since the last group, which the capture
makes again from its committed position (at most one group of rows). The inputs of one
block pass (a plain capture folds them all at once) commit at their own group boundaries
(``group_chunks`` grows with the width), so a resumed pass starts at the fewest committed
and each fold skips the chunks it holds already.
"""

from __future__ import annotations

import time

import torch

from .. import checkpoint
from ..devices import torch_threads
from ..reduce import DTYPES, Partial, ReduceConfig, fold_group, result_path, result_state, write_result
from ..reduce.result import RESTART_HINT, read_meta, result_meta
from ..store import format as fmt

FOLDED = "folded_crc32"  # result metadata: the checksums of every chunk its R holds


def reduce_config(plan, inputs: str | None = None) -> ReduceConfig:
    """How the capture reduces its inputs (reduce's defaults on the capture's device, a
    `capture.Plan`'s); the in-memory fold folds with the same, so both give one R."""
    return ReduceConfig(device=str(plan.device), inputs=inputs, threads=plan.compute_threads)


class GroupFold:
    """Input ``name``'s R, extended group by group as whole chunks arrive (`add`)."""

    def __init__(self, store, name: str, cfg: ReduceConfig, part: Partial, device_label: str):
        self.store, self.name, self.cfg = store, name, cfg
        info = store.input(name)
        self.n, self.chunk_tokens = info.n, info.chunk_tokens
        self.settings = cfg.settings(info.n, info.chunk_tokens)
        self.g = self.settings["group_chunks"]
        self.part, self.device_label = part, device_label
        self.device = torch.device(cfg.device)
        self.crcs = list(info.chunk_crc32)
        self.group: list[tuple[int, torch.Tensor]] = []
        self.path = result_path(store, name)
        self.seconds = self.cpu_seconds = 0.0  # this run's folds
        self.before = 0.0  # fold seconds of earlier runs (the result records the sum)

    @classmethod
    def open(cls, store, name: str, cfg: ReduceConfig) -> GroupFold | None:
        """The fold of ``name`` from where its result stands, a commit its last run wrote
        ahead rolled forward; None when the store holds chunks its result does not cover
        (begun by a capture that wrote its rows: it goes on as it began)."""
        info = store.input(name)
        path = result_path(store, name)
        label = str(torch.device(cfg.device))
        if not path.is_file():
            if info.num_chunks:
                return None
            return cls(store, name, cfg, Partial.empty(info.n, cfg.device, cfg.with_gram), label)
        meta = read_meta(path)
        folded, ahead = meta.get(FOLDED), int(meta.get("next_chunk", 0))
        if (isinstance(folded, list) and ahead == len(folded) > info.num_chunks
                and [int(c) for c in folded[:info.num_chunks]] == info.chunk_crc32):
            store.commit_folded(name, folded)  # killed between the result and its commit
            info = store.input(name)
        state = result_state(store, info, cfg.settings(info.n, info.chunk_tokens))
        if state.label != "complete":  # reduce judges and reports any other state
            return None
        tensors, meta = checkpoint.load_state(path, fix=RESTART_HINT)
        part = Partial(tensors["R"], tensors["abs_sum"], tensors.get("gram"), int(meta["tokens"]))
        fold = cls(store, name, cfg, part.to(cfg.device), label)
        fold.before = float(meta.get("seconds", 0.0))
        return fold

    def add(self, index: int, chunk: torch.Tensor) -> None:
        """Whole chunk ``index`` (the next one); folds and commits at a group boundary."""
        if index != len(self.crcs):
            raise ValueError(f"chunk {index} of {self.name!r} after {len(self.crcs)} chunks")
        self.crcs.append(fmt.crc32(fmt.to_stored(chunk)))
        self.group.append((index, chunk))
        if (index + 1) % self.g == 0:
            self.flush()

    def flush(self) -> None:
        """Fold and commit the chunks since the last boundary: at each boundary, and once
        after the input's last whole chunk (reduce's last group ends there too)."""
        if not self.group:
            return
        t, c = time.perf_counter(), time.process_time()
        with torch_threads(self.cfg.threads):
            fold_group(self.part, self.group, name=self.name, n=self.n,
                       dtype=DTYPES[self.cfg.dtype], device=self.device)
        self.group = []
        self.seconds += time.perf_counter() - t
        self.cpu_seconds += time.process_time() - c
        crcs = list(self.crcs)
        meta = result_meta(self.store.input(self.name), self.part, next_chunk=len(crcs),
                           chunks=len(crcs), fingerprint=self.store.fingerprint(self.name, ahead=crcs),
                           settings=self.settings, dtype=self.cfg.dtype, device=self.device_label,
                           seconds=self.before + self.seconds)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # reduce's lock, as reduce writes its results: no `coala-stream reduce` at the same time
        with checkpoint.StoreLock(self.path.parent / checkpoint.REDUCE_LOCK, what="reduce"):
            write_result(self.path, self.part, {**meta, FOLDED: crcs})
            self.store.commit_folded(self.name, crcs)
