"""The reduce driver: fold each stored input into its triangular factor R, resumably.

For every selected input, chunks are read in order (`prefetch`), folded group by
group (`fold`), and the state is checkpointed at group boundaries at least every
``checkpoint_every`` seconds (`result`), so a rerun repeats exactly the QRs of
an uninterrupted run: on the same machine, device, torch build and thread count
the final R is bit-identical however often the run was killed. With ``workers``
or ``scheduler`` the folding runs on Dask (`dask_driver`).

Memory: about ``prefetch`` stored chunks plus one upcast group, the stacked
[R; X] and the QR's workspace: it depends on n and the chunk size, never on the
store's size (tools/bench_reduce.py measures it).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint
from ..devices import resolve_device, torch_threads
from ..errors import CheckpointMismatch, DataError, UsageError
from ..signals import StopRequests
from ..store import open_store
from . import result as res
from .bars import Bars, chunk_bytes
from .config import DTYPES, TEST_DELAY_ENV, ReduceConfig
from .fold import Partial, fold_group, plan_groups
from .prefetch import ChunkPrefetcher


def run_reduce(store_path, config: ReduceConfig | None = None, progress: bool = True) -> dict:
    """Fold every selected input of the store at ``store_path`` into R; returns a summary.

    Holds the store's reduce lock for the whole run (LockedError if another
    reduce holds it). Already finished inputs are skipped; checkpoints are
    resumed. Raises Interrupted (exit code 75) after saving a checkpoint when
    SIGINT/SIGTERM arrives (also during the very last group: the result is
    saved, then Interrupted), DataError for a corrupt or non-finite chunk
    (naming input and chunk; progress up to the last whole group is saved),
    CheckpointMismatch for a checkpoint made from other data or settings.

    Summary: ``{"store", "reduce_dir", "mode", "device", "dtype", "threads", "inputs":
    {name: {"action", "tokens", "chunks", "bytes", "seconds", "path"}},
    "bytes_folded", "seconds", "gb_per_s", "capture": {"complete", "samples_done",
    "samples"}}``; ``action`` is one of folded, resumed, extended (a finished result
    continued over chunks added since), skipped (already complete); ``bytes`` counts
    stored activations folded by this run; ``capture`` says whether the store's capture
    had finished (an unfinished one is reduced as far as it is committed); ``threads``: torch's
    CPU threads in this process (``config.threads``, or the caller's setting when None).
    """
    config = config or ReduceConfig()
    config.validate()
    t0 = time.monotonic()
    with open_store(store_path) as store:
        names = select_inputs(store.inputs, config.inputs)
        reduce_dir = Path(store.reduce_dir)
        reduce_dir.mkdir(parents=True, exist_ok=True)
        with checkpoint.StoreLock(reduce_dir / checkpoint.REDUCE_LOCK, what="reduce") as lock, \
                StopRequests("reduce") as stop, torch_threads(config.threads):
            checkpoint.remove_temp_files(reduce_dir)  # leftovers of a killed run's writes
            if config.restart:
                res.check_restartable(store)  # a merged store's R's cannot be refolded
                for name in names:
                    res.result_path(store, name).unlink(missing_ok=True)
                if config.inputs is None:  # started over: this run's count is the new record
                    (reduce_dir / res.RUN_RECORD).unlink(missing_ok=True)
            threads, note = res.run_threads(reduce_dir, config.threads, torch.get_num_threads())
            if note and progress:
                print(note, file=sys.stderr, flush=True)
            run = Run(store, config, lock, stop, progress)
            with torch_threads(threads):
                if config.distributed:
                    from .dask_driver import fold_on_dask

                    inputs = fold_on_dask(run, names)
                else:
                    inputs = run.local(names)
        capture = store.attrs.get("capture") or {}
        samples = (store.attrs.get("calibration") or {}).get("samples")
        merged = len(res.merged_from(store) or [])
    seconds = time.monotonic() - t0
    folded = sum(v["bytes"] for v in inputs.values())
    return {
        "store": str(store_path), "reduce_dir": str(reduce_dir),
        "mode": "dask" if config.distributed else "local", "device": run.device_label,
        "dtype": config.dtype, "threads": threads, "inputs": inputs, "bytes_folded": folded,
        "seconds": seconds,
        "gb_per_s": folded / seconds / 1e9 if seconds > 0 else 0.0,
        "capture": {"complete": bool(capture.get("complete")),
                    "samples_done": int(capture.get("samples_done", 0)), "samples": samples,
                    "merged_shards": merged},
    }


def select_inputs(names: list[str], pattern: str | None) -> list[str]:
    """Stored input names matching ``pattern`` (re.search); UsageError if none does."""
    if pattern is None:
        return list(names)
    chosen = [n for n in names if re.search(pattern, n)]
    if not chosen:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UsageError(f"--inputs: no stored input matches {pattern!r} (the store has "
                         f"{len(names)}: {shown})")
    return chosen


@dataclass
class Job:
    """One input's work: where it starts (from its checkpoint) and what is known about it."""

    name: str
    info: object  # store InputInfo
    settings: dict
    part: Partial
    start: int  # first chunk to fold (the checkpoint's next_chunk)
    seconds: float  # fold time of earlier runs
    action: str  # folded | resumed | extended | skipped
    path: Path


class Run:
    """One reduce run over the selected inputs; holds the context the local loop and the
    Dask driver share (store, settings, lock, stop flag, checkpoints)."""

    def __init__(self, store, config: ReduceConfig, lock, stop, progress):
        self.store, self.cfg, self.lock, self.stop = store, config, lock, stop
        self.device = torch.device("cpu") if config.distributed else resolve_device(config.device)
        self.device_label = f"dask:{config.device}" if config.distributed else str(self.device)
        self.dtype = DTYPES[config.dtype]
        self.delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
        self.progress = progress

    def job(self, name: str) -> Job:
        """The input's job, decided by `result.result_state` (as status and solve judge it)."""
        info = self.store.input(name)
        settings = self.cfg.settings(info.n, info.chunk_tokens)
        path = res.result_path(self.store, name)
        state = res.result_state(self.store, info, settings)
        res.check_state(state)  # CheckpointMismatch: other data or settings
        if state.label == "not started":
            part = Partial.empty(info.n, self.device, self.cfg.with_gram)
            return Job(name, info, settings, part, 0, 0.0, "folded", path)
        seconds = float(state.meta.get("seconds", 0.0))
        if state.label == "complete":  # the header only: a finished input costs no tensor read
            return Job(name, info, settings, Partial(None, None, None, state.tokens),
                       state.next_chunk, seconds, "skipped", path)
        tensors, meta = checkpoint.load_state(path, fix=res.RESTART_HINT)
        if "R" not in tensors or "abs_sum" not in tensors:
            raise CheckpointMismatch(f"{path} is not a reduce checkpoint (no R or abs_sum "
                                     f"tensor); {res.RESTART_HINT}")
        part = Partial(tensors["R"], tensors["abs_sum"], tensors.get("gram"), int(meta["tokens"]))
        start = state.next_chunk
        group = res.group_state(tensors, meta) if state.label == "behind" else None
        if group is not None and info.dropped <= group[0] < start:
            # from the last group boundary: the same groups as one reduce of the longer store
            start, t, tokens = group
            part = Partial(t["R"], t["abs_sum"], t.get("gram"), tokens)
        action = "extended" if state.label == "behind" else "resumed"
        return Job(name, info, settings, part.to(self.device), start, seconds, action, path)

    def save(self, job: Job, next_chunk: int, seconds: float, at_group=None) -> None:
        """Write the job's state after ``next_chunk`` chunks (atomically; complete at the end);
        ``at_group``: (chunk, `Partial`) at the last group boundary, kept beside it."""
        group = {} if at_group is None else {"group_chunk": at_group[0]}
        meta = res.result_meta(job.info, job.part, next_chunk=next_chunk,
                               fingerprint=self.store.fingerprint(job.name, upto=next_chunk),
                               settings=job.settings, dtype=self.cfg.dtype,
                               device=self.device_label, seconds=seconds)
        res.write_result(job.path, job.part, {**meta, **group},
                         at_group=None if at_group is None else at_group[1])

    def summary(self, job: Job, seconds: float) -> dict:
        done = range(0) if job.action == "skipped" else range(job.start, job.info.num_chunks)
        return {"action": job.action, "tokens": job.part.tokens, "chunks": job.info.num_chunks,
                "bytes": sum(chunk_bytes(job.info, i) for i in done), "seconds": seconds,
                "path": str(job.path)}

    def local(self, names: list[str]) -> dict:
        out = {}
        with Bars(self.store, names, enabled=self.progress) as bars:
            for name in names:
                self.stop.check(f"before input {name!r}")
                job = self.job(name)
                bars.begin(job)
                out[name] = self.summary(job, job.seconds) if job.action == "skipped" \
                    else self.fold_input(job, bars)
        return out

    def fold_input(self, job: Job, bars: Bars) -> dict:
        """Fold the job's remaining chunks group by group, checkpointing at group boundaries."""
        info, part = job.info, job.part
        if part.R is None and info.num_chunks == 0:  # nothing captured: R of no rows is 0 x n
            part.R = torch.zeros(0, info.n, dtype=self.dtype, device=self.device)
        t0 = saved_at = time.monotonic()
        done = job.start  # chunks folded into part
        g, at_group = job.settings["group_chunks"], None
        growing = self._growing()
        with ChunkPrefetcher(lambda i: self.store.read_chunk(job.name, i), job.start,
                             info.num_chunks, depth=self.cfg.prefetch,
                             threads=self.cfg.read_threads, pin=self.device.type == "cuda") as chunks:
            for a, b in plan_groups(job.start, info.num_chunks, g):
                if growing and b % g and a % g == 0:  # a group the capture may still lengthen
                    at_group = (a, part.copy())
                self._fold_group(job, chunks, a, b, done, t0)
                done = b
                bars.update(sum(chunk_bytes(info, i) for i in range(a, b)))
                if self.delay:
                    time.sleep(self.delay)
                self.lock.check()
                now = time.monotonic()
                due = self.stop or now - saved_at >= self.cfg.checkpoint_every
                if due and done < info.num_chunks:  # the last group is saved below, as the result
                    self.save(job, done, job.seconds + now - t0)
                    saved_at = now
                if done < info.num_chunks:
                    self.stop.check(f"in input {job.name!r} at chunk {done} of "
                                    f"{info.num_chunks}; checkpoint saved to {job.path}")
        seconds = job.seconds + time.monotonic() - t0
        self.save(job, info.num_chunks, seconds, at_group)
        return self.summary(job, seconds)

    def _growing(self) -> bool:
        """Whether the store's capture may still add chunks that a later reduce must fold in
        the groups of one reduce of the finished store (D7 of issue 22). Not a propagating
        capture's store: its reduces always extend a result by the one pending chunk, as the
        capture's own solve folded it (`sequential.propagate.reduced_input`), so the store's
        R stays the one its factors were solved from."""
        attrs = self.store.attrs
        return not ((attrs.get("capture") or {}).get("complete")
                    or (attrs.get("capture_settings") or {}).get("propagate"))

    def _fold_group(self, job: Job, chunks, a: int, b: int, done: int, t0: float) -> None:
        try:
            fold_group(job.part, chunks.take(b - a), name=job.name, n=job.info.n,
                       dtype=self.dtype, device=self.device)
        except DataError as exc:
            if done > job.start:  # keep the progress up to the last whole group
                self.save(job, done, job.seconds + time.monotonic() - t0)
            raise DataError(f"{exc}; progress is saved up to chunk {done} of "
                            f"{job.info.num_chunks}: repair the store, then rerun to resume") from exc
