"""The reduce driver: fold each stored input into its triangular factor R.

For every input of an activation store, chunks are read in order (a bounded
background prefetch), upcast on the device and folded into R with
``linalg.fold_block`` (sequential TSQR: Demmel, Grigori, Hoemmen & Langou,
2012), so neither X nor X^T X is ever held; the COALA method (Parkina et al.,
arXiv 2507.07580) needs only R. Beside R each input gets ``abs_sum`` (float64
column sums of |x|, for ASVD) and, with ``with_gram``, the float32 Gram matrix
as peers accumulate it (for the SVD-LLM baseline only).

Output, one file per input: ``store.reduce_dir / "<name>.safetensors"`` in the
``checkpoint.save_state`` format (docs/design.md, "Reduce output"). The same
file is the checkpoint (``complete: false``) written at least every
``checkpoint_every`` seconds, and the result.

Resume determinism: chunks are folded in *groups*, fixed ranges of chunk
indices ``[j g, (j + 1) g)`` with ``g = ceil(group_rows / chunk_tokens)``
(``group_rows`` defaults to 2 n), and a checkpoint is only ever written at a
group boundary. A rerun starts at the checkpoint's ``next_chunk`` and so
repeats exactly the QRs an uninterrupted run would have done: on the same
machine and device, the final R is bit-identical however often the run was
killed. The checkpoint records the store fingerprint of the chunks folded and
the settings that change the numbers (dtype, with_gram, group size); a
mismatch raises CheckpointMismatch (``restart=True`` discards checkpoints).

Memory: about ``prefetch`` stored chunks plus one upcast group (g chunks),
the stacked [R; X] and the QR's workspace: it depends on n and the chunk
size, never on the store's size (tools/bench_reduce.py measures it).

Dask (``workers`` or ``scheduler``): contiguous, group-aligned chunk ranges
fold into partial R's in pure tasks that open the store by path; the partial
R's merge in a binary tree with ``merge_r``. Lost workers are recomputed by
Dask. Checkpointing there is per input: the result file is written when an
input's tree finishes (a partial checkpoint from a local run is merged in).
The result equals the local R to working precision, not bit for bit.

Scripts that call ``run_reduce`` with ``workers`` need the usual
``if __name__ == "__main__":`` guard: Dask starts worker processes with spawn.

Test-only hook: the environment variable ``COALA_STREAM_TEST_GROUP_DELAY``
(seconds) makes the local loop and the Dask tasks sleep after every group, so
tests can kill a run (or a worker) at random moments of a small store. Not for
users.
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import checkpoint
from ._version import __version__
from .devices import resolve_device, torch_threads
from .errors import CheckpointMismatch, DataError, Interrupted, UsageError
from .linalg import NOT_FINITE, fold_block, merge_r, prepare_block

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TEST_DELAY_ENV = "COALA_STREAM_TEST_GROUP_DELAY"
# Settings that change the numbers of R: a checkpoint made with others is refused.
RESULT_SETTINGS = ("dtype", "with_gram", "group_chunks")


@dataclass
class ReduceConfig:
    """Settings of one reduce run; each field's ``help`` is also its CLI help."""

    device: str = field(default="auto", metadata={
        "help": "where to fold: 'auto' (cuda when available, else cpu), 'cuda', 'cuda:N' or 'cpu'"})
    dtype: str = field(default="float32", metadata={
        "help": "working precision of R: float32 or float64 (16-bit chunks are upcast on the device)"})
    checkpoint_every: float = field(default=60.0, metadata={
        "help": "seconds between checkpoints (0: after every group); one is always written at the end"})
    inputs: str | None = field(default=None, metadata={
        "help": "only inputs whose name matches this regular expression (re.search)"})
    group_rows: int | None = field(default=None, metadata={
        "help": "fold at least this many rows per QR, as whole chunks (default 2 n); "
                "part of the checkpoint's identity"})
    with_gram: bool = field(default=False, metadata={
        "help": "also accumulate the float32 Gram matrix X^T X as peers do (only for the "
                "SVD-LLM baseline comparison; R never needs it)"})
    workers: int | None = field(default=None, metadata={
        "help": "fold on a local Dask cluster of this many worker processes"})
    scheduler: str | None = field(default=None, metadata={
        "help": "fold on an existing Dask cluster (scheduler address, e.g. tcp://host:8786)"})
    prefetch: int = field(default=4, metadata={
        "help": "chunks read ahead in the background (bounds the memory used for reading)"})
    read_threads: int = field(default=2, metadata={
        "help": "background threads reading and decompressing chunks"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads for the fold (default: torch's own choice, usually one per "
                "core); fewer leave cores to reading and to other jobs"})
    restart: bool = field(default=False, metadata={
        "help": "discard existing checkpoints and results of the selected inputs first"})

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not (isinstance(self.checkpoint_every, (int, float)) and self.checkpoint_every >= 0):
            raise UsageError(f"checkpoint_every: expected seconds >= 0, got {self.checkpoint_every!r}")
        for name in ("group_rows", "workers", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("prefetch", "read_threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.workers is not None and self.scheduler is not None:
            raise UsageError("workers and scheduler: give one of them (a local cluster or an address), not both")
        if self.inputs is not None:
            try:
                re.compile(self.inputs)
            except re.error as exc:
                raise UsageError(f"inputs: not a valid regular expression {self.inputs!r} ({exc})") from exc
        if not self.distributed:  # Dask workers resolve the device themselves
            resolve_device(self.device)

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.scheduler is not None


def config_help(name: str) -> str:
    """The help text of a ReduceConfig field (the CLI uses it, so --help and the code agree)."""
    return next(f.metadata["help"] for f in fields(ReduceConfig) if f.name == name)


# -- the fold state and its kernel (shared by the local loop and the Dask tasks) ---------


@dataclass
class Partial:
    """R and statistics of a contiguous range of rows. R is None before the first fold."""

    R: torch.Tensor | None
    abs_sum: torch.Tensor  # (n,) float64
    gram: torch.Tensor | None  # (n x n) float32, only with_gram
    tokens: int = 0

    @classmethod
    def empty(cls, n: int, device, with_gram: bool) -> Partial:
        gram = torch.zeros(n, n, dtype=torch.float32, device=device) if with_gram else None
        return cls(None, torch.zeros(n, dtype=torch.float64, device=device), gram)

    def to(self, device) -> Partial:
        move = (lambda t: None if t is None else t.to(device))
        return Partial(move(self.R), move(self.abs_sum), move(self.gram), self.tokens)


def fold_group(part: Partial, chunks: list[tuple[int, torch.Tensor]], *, name: str,
               n: int, dtype: torch.dtype, device: torch.device) -> None:
    """Fold one group of chunks (index, stored tensor) into ``part`` in place.

    The chunks are validated and upcast on the device (``prepare_block``),
    stacked and folded in one QR of [R; X] (about 2 (k + t) n^2 flops for
    t new rows). NaN/Inf raises DataError naming the input and the chunk.
    """
    blocks = []
    for index, chunk in chunks:
        chunk = chunk.to(device, non_blocking=True)  # still 16-bit: upcast happens on the device
        try:
            blocks.append(prepare_block(chunk, f"input {name!r} chunk {index}", n, dtype, device,
                                        check_finite=False))
        except UsageError as exc:
            raise DataError(f"input {name!r} chunk {index}: {_reason(exc)}") from exc
    X = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    if X.shape[0] == 0:
        return
    # The column sums ASVD needs are also the NaN/Inf test: in float64 a sum of finite
    # float32 magnitudes cannot overflow, so it is finite exactly when X is. One pass
    # instead of isfinite(X) plus a float64-accumulating reduction (3.6 -> 0.5 ms per
    # 2048 x 576 chunk on one CPU thread: 20 % of reduce's time).
    # Chunk by chunk (the float64 copy is one chunk's); part changes only once all passed.
    col_sums = torch.zeros_like(part.abs_sum)
    for (index, _), block in zip(chunks, blocks):
        sums = block.abs().double().sum(0)
        if not bool(torch.isfinite(sums).all()):
            raise DataError(f"input {name!r} chunk {index}: {NOT_FINITE}")
        col_sums += sums
    part.abs_sum += col_sums
    if part.gram is not None:
        Xg = X.float()
        part.gram.addmm_(Xg.T, Xg)
    part.R = fold_block(part.R, X)
    part.tokens += X.shape[0]


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Partial of the rows of a then b (TSQR merge of the R's, sums of the statistics)."""
    if a.R is None:
        return b
    if b.R is None:
        return a
    gram = None if a.gram is None else a.gram + b.gram.to(a.gram.device)
    return Partial(merge_r(a.R, b.R), a.abs_sum + b.abs_sum.to(a.abs_sum.device), gram,
                   a.tokens + b.tokens)


def group_chunks(n: int, chunk_tokens: int, group_rows: int | None) -> int:
    """Chunks per fold group: the fewest whole chunks holding ``group_rows`` (default 2 n) rows."""
    rows = 2 * n if group_rows is None else group_rows
    return max(1, math.ceil(rows / max(1, chunk_tokens)))


def plan_groups(start: int, stop: int, g: int) -> list[tuple[int, int]]:
    """Chunk ranges folded together: boundaries at multiples of g (plus start and stop).

    Fixed by chunk index alone, so a resumed run repeats the uninterrupted
    run's QRs exactly.
    """
    edges = [start] + list(range((start // g + 1) * g, stop, g)) + [stop]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


# -- background reading ----------------------------------------------------------------


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


# -- signals -------------------------------------------------------------------------------


class StopRequests:
    """SIGINT/SIGTERM set a flag the fold loop checks between groups.

    A second signal restores the previous handlers and re-raises it, so a
    user can always force an exit (the last checkpoint stays valid).
    Installed only from the main thread (signal's rule); elsewhere a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signame: str | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()

    def _handle(self, signum, frame):
        if self.signame is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signame = signal.Signals(signum).name

    def _restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# -- the driver ------------------------------------------------------------------------------


def run_reduce(store_path, config: ReduceConfig | None = None, progress: bool = True) -> dict:
    """Fold every selected input of the store at ``store_path`` into R; returns a summary.

    Holds the store's reduce lock for the whole run (LockedError if another
    reduce holds it). Already finished inputs are skipped; checkpoints are
    resumed. Raises Interrupted (exit code 75) after saving a checkpoint when
    SIGINT/SIGTERM arrives, DataError for a corrupt or non-finite chunk
    (naming input and chunk; progress up to the last whole group is saved),
    CheckpointMismatch for a checkpoint made from other data or settings.

    Summary: ``{"store", "reduce_dir", "mode", "device", "dtype", "inputs":
    {name: {"action", "tokens", "chunks", "bytes", "seconds", "path"}},
    "bytes_folded", "seconds", "gb_per_s"}``; ``action`` is one of folded,
    resumed, extended (a finished result continued over chunks added since),
    skipped (already complete); ``bytes`` counts stored activations folded
    by this run.
    """
    from .store import open_store

    config = config or ReduceConfig()
    config.validate()
    t0 = time.monotonic()
    with open_store(store_path) as store:
        names = select_inputs(store.inputs, config.inputs)
        reduce_dir = Path(store.reduce_dir)
        reduce_dir.mkdir(parents=True, exist_ok=True)
        with checkpoint.StoreLock(reduce_dir / "lock", what="reduce") as lock, \
                StopRequests() as stop, torch_threads(config.threads):
            checkpoint.remove_temp_files(reduce_dir)  # leftovers of a killed run's writes
            if config.restart:
                for name in names:
                    factor_path(store, name).unlink(missing_ok=True)
            run = _Run(store, config, lock, stop, progress)
            inputs = run.dask(names) if config.distributed else run.local(names)
    seconds = time.monotonic() - t0
    folded = sum(v["bytes"] for v in inputs.values())
    return {
        "store": str(store_path), "reduce_dir": str(reduce_dir),
        "mode": "dask" if config.distributed else "local", "device": run.device_label,
        "dtype": config.dtype, "inputs": inputs, "bytes_folded": folded, "seconds": seconds,
        "gb_per_s": folded / seconds / 1e9 if seconds > 0 else 0.0,
    }


def select_inputs(names: list[str], pattern: str | None) -> list[str]:
    """Stored input names matching ``pattern`` (re.search); UsageError if none does."""
    if pattern is None:
        return list(names)
    chosen = [n for n in names if re.search(pattern, n)]
    if not chosen:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UsageError(f"inputs: no stored input matches {pattern!r} (the store has {len(names)}: {shown})")
    return chosen


def factor_path(store, name: str) -> Path:
    return Path(store.reduce_dir) / f"{name}.safetensors"


@dataclass
class _Job:
    """One input's work: where it starts (from its checkpoint) and what is known about it."""

    name: str
    info: object  # store InputInfo
    settings: dict
    part: Partial
    start: int  # first chunk to fold (the checkpoint's next_chunk)
    seconds: float  # fold time of earlier runs
    action: str  # folded | resumed | extended | skipped
    path: Path


class _Run:
    """One reduce run over the selected inputs (local loop or Dask); holds the shared context."""

    def __init__(self, store, config: ReduceConfig, lock, stop, progress):
        self.store, self.cfg, self.lock, self.stop = store, config, lock, stop
        self.device = torch.device("cpu") if config.distributed else resolve_device(config.device)
        self.device_label = f"dask:{config.device}" if config.distributed else str(self.device)
        self.dtype = DTYPES[config.dtype]
        self.delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
        self.progress = progress

    # checkpoints

    def job(self, name: str) -> _Job:
        """The input's job: a fresh state, or the checkpoint's after checking it matches."""
        info = self.store.input(name)
        settings = {"dtype": self.cfg.dtype, "with_gram": self.cfg.with_gram,
                    "group_chunks": group_chunks(info.n, info.chunk_tokens, self.cfg.group_rows),
                    "group_rows": self.cfg.group_rows, "chunk_tokens": info.chunk_tokens}
        path = factor_path(self.store, name)
        if not path.exists():
            part = Partial.empty(info.n, self.device, self.cfg.with_gram)
            return _Job(name, info, settings, part, 0, 0.0, "folded", path)
        meta = checkpoint.load_meta(path)  # the header only: a finished input costs no tensor read
        start = self.check_checkpoint(path, info, settings, meta)
        if meta.get("complete") and start == info.num_chunks:
            return _Job(name, info, settings, Partial(None, None, None, int(meta["tokens"])), start,
                        float(meta.get("seconds", 0.0)), "skipped", path)
        tensors, meta = checkpoint.load_state(path)
        if "R" not in tensors or "abs_sum" not in tensors:
            raise CheckpointMismatch(f"{path} is not a reduce checkpoint (no R or abs_sum tensor); "
                                     f"rerun with --restart to discard it and start this input over")
        part = Partial(tensors["R"], tensors["abs_sum"], tensors.get("gram"), int(meta["tokens"]))
        return _Job(name, info, settings, part.to(self.device), start, float(meta.get("seconds", 0.0)),
                    "extended" if meta.get("complete") else "resumed", path)

    def check_checkpoint(self, path, info, settings, meta) -> int:
        """The checkpoint's next_chunk; CheckpointMismatch if it is not from this data and settings."""
        hint = "rerun with --restart to discard it and start this input over"
        if "next_chunk" not in meta or "tokens" not in meta:
            raise CheckpointMismatch(f"{path} is not a reduce checkpoint (no next_chunk); {hint}")
        for key in RESULT_SETTINGS:
            old = meta.get("settings", {}).get(key)
            if old != settings[key]:
                raise CheckpointMismatch(
                    f"{path} was made with {key}={old!r}, this run uses {key}={settings[key]!r}; "
                    f"use the same settings to resume, or {hint}")
        next_chunk = int(meta["next_chunk"])
        if next_chunk > info.num_chunks:
            raise CheckpointMismatch(
                f"{path} folded {next_chunk} chunks of input {info.name!r} but the store now holds "
                f"{info.num_chunks}: the store was rolled back or recaptured; {hint}")
        if meta.get("fingerprint") != self.store.fingerprint(info.name, upto=next_chunk):
            raise CheckpointMismatch(
                f"{path} does not match the store: chunks 0..{next_chunk - 1} of input "
                f"{info.name!r} differ from those it folded (another store, or rewritten chunks); {hint}")
        return next_chunk

    def save(self, job: _Job, next_chunk: int, seconds: float) -> None:
        """Write the job's state after ``next_chunk`` chunks (atomically; complete at the end)."""
        info, part = job.info, job.part
        tensors = {"R": part.R, "abs_sum": part.abs_sum}
        if part.gram is not None:
            tensors["gram"] = part.gram
        meta = {
            "input": job.name, "n": info.n,
            "fingerprint": self.store.fingerprint(job.name, upto=next_chunk),
            "next_chunk": next_chunk, "chunks": info.num_chunks, "tokens": part.tokens,
            "complete": next_chunk == info.num_chunks, "dtype": self.cfg.dtype,
            "device": self.device_label, "threads": torch.get_num_threads(),
            "seconds": round(seconds, 3), "settings": job.settings, "tool_version": __version__,
        }
        checkpoint.save_state(job.path, tensors, meta)

    def summary(self, job: _Job, seconds: float) -> dict:
        done = range(0) if job.action == "skipped" else range(job.start, job.info.num_chunks)
        return {"action": job.action, "tokens": job.part.tokens, "chunks": job.info.num_chunks,
                "bytes": sum(_chunk_bytes(job.info, i) for i in done), "seconds": seconds,
                "path": str(job.path)}

    def interrupted(self, where: str) -> Interrupted:
        return Interrupted(f"stopped by {self.stop.signame} {where}; rerun the same command to resume")

    # the local loop

    def local(self, names: list[str]) -> dict:
        out = {}
        with _Progress(self.store, names, enabled=self.progress) as bars:
            for name in names:
                if self.stop.signame:
                    raise self.interrupted(f"before input {name!r}")
                job = self.job(name)
                bars.begin(job)
                out[name] = self.summary(job, job.seconds) if job.action == "skipped" \
                    else self.fold_input(job, bars)
        return out

    def fold_input(self, job: _Job, bars: _Progress) -> dict:
        """Fold the job's remaining chunks group by group, checkpointing at group boundaries."""
        info, part = job.info, job.part
        if part.R is None and info.num_chunks == 0:  # nothing captured: R of no rows is 0 x n
            part.R = torch.zeros(0, info.n, dtype=self.dtype, device=self.device)
        t0 = saved_at = time.monotonic()
        done = job.start  # chunks folded into part
        with ChunkPrefetcher(lambda i: self.store.read_chunk(job.name, i), job.start,
                             info.num_chunks, depth=self.cfg.prefetch,
                             threads=self.cfg.read_threads, pin=self.device.type == "cuda") as chunks:
            for a, b in plan_groups(job.start, info.num_chunks, job.settings["group_chunks"]):
                try:
                    fold_group(part, chunks.take(b - a), name=job.name, n=info.n,
                               dtype=self.dtype, device=self.device)
                except DataError as exc:
                    if done > job.start:  # keep the progress up to the last whole group
                        self.save(job, done, job.seconds + time.monotonic() - t0)
                    raise DataError(f"{exc}; progress is saved up to chunk {done} of "
                                    f"{info.num_chunks}: repair the store, then rerun to resume") from exc
                done = b
                bars.update(sum(_chunk_bytes(info, i) for i in range(a, b)))
                if self.delay:
                    time.sleep(self.delay)
                self.lock.check()
                now = time.monotonic()
                due = self.stop.signame or now - saved_at >= self.cfg.checkpoint_every
                if due and done < info.num_chunks:  # the last group is saved below, as the result
                    self.save(job, done, job.seconds + now - t0)
                    saved_at = now
                if self.stop.signame and done < info.num_chunks:
                    raise self.interrupted(f"in input {job.name!r} at chunk {done} of "
                                           f"{info.num_chunks}; checkpoint saved to {job.path}")
        seconds = job.seconds + time.monotonic() - t0
        self.save(job, info.num_chunks, seconds)
        return self.summary(job, seconds)

    # the Dask path

    def dask(self, names: list[str]) -> dict:
        """All inputs' trees submitted at once; each result file is written as its tree finishes."""
        from distributed import as_completed

        out, pending = {}, {}
        client, cluster = _dask_client(self.cfg)
        try:
            with _Progress(self.store, names, enabled=self.progress) as bars:
                nworkers = max(1, len(client.scheduler_info().get("workers", {})))
                for name in names:
                    job = self.job(name)
                    bars.begin(job, per_input=False)  # all inputs fold at once: overall bar only
                    if job.action == "skipped":
                        out[name] = self.summary(job, job.seconds)
                    else:
                        pending[self.submit_tree(client, job, nworkers)] = (job, time.monotonic())
                finished = as_completed(list(pending))
                while pending:
                    if self.stop.signame:
                        left = ", ".join(job.name for job, _ in pending.values())
                        raise self.interrupted(
                            f"with inputs still folding on Dask ({left}); finished inputs are saved, "
                            f"the others restart from their last checkpoint")
                    self.lock.check()
                    if not finished.has_ready():
                        time.sleep(0.05)  # poll, so a signal is seen while Dask works
                        continue
                    for fut in finished.next_batch(block=False):
                        job, t0 = pending.pop(fut)
                        out[job.name] = self.finish_tree(job, fut.result(), job.seconds + time.monotonic() - t0)
                        bars.update(sum(_chunk_bytes(job.info, i)
                                        for i in range(job.start, job.info.num_chunks)))
        finally:
            for fut in pending:
                fut.cancel()
            client.close()
            if cluster is not None:
                cluster.close()
        return {name: out[name] for name in names}

    def submit_tree(self, client, job: _Job, nworkers: int):
        """Future of the Partial of the job's chunks: group-aligned ranges folded on workers,
        merged pairwise (a binary tree keeping the rows' order)."""
        info, g = job.info, job.settings["group_chunks"]
        groups = plan_groups(job.start, info.num_chunks, g)
        if not groups:
            return client.submit(_nothing, job.name, pure=True)
        per = math.ceil(len(groups) / min(len(groups), 2 * nworkers))  # ~2 ranges per worker
        ranges = [(groups[i][0], groups[min(i + per, len(groups)) - 1][1])
                  for i in range(0, len(groups), per)]
        level = [client.submit(fold_range_task, str(self.store.path), job.name, a, b,
                               list(info.chunk_crc32[a:b]), g, self.cfg.dtype, self.cfg.device,
                               self.cfg.with_gram, pure=True)
                 for a, b in ranges]
        while len(level) > 1:
            level = [client.submit(merge_task, *level[i:i + 2], pure=True) if i + 1 < len(level)
                     else level[i] for i in range(0, len(level), 2)]
        return level[0]

    def finish_tree(self, job: _Job, result: Partial | None, seconds: float) -> dict:
        """Merge a finished tree after the checkpointed state and write the result file."""
        if result is not None:
            job.part = merge_partials(job.part, result)
        if job.part.R is None:
            job.part.R = torch.zeros(0, job.info.n, dtype=self.dtype)
        self.save(job, job.info.num_chunks, seconds)
        return self.summary(job, seconds)


# -- Dask tasks: pure functions of their arguments (Dask may rerun them on worker loss) ----------


def fold_range_task(store_path: str, name: str, start: int, stop: int, crc32s: list[int],
                    g: int, dtype: str, device: str, with_gram: bool) -> Partial:
    """Partial (on CPU) of chunks [start, stop) of one input, folded in the same groups as locally.

    ``crc32s`` (the store's checksums of those chunks when the run began)
    make the task's identity follow the data; a store changed since refuses.
    """
    from .store import open_store

    _limit_worker_threads()
    dev = resolve_device(device)
    with open_store(store_path) as store:
        info = store.input(name)
        if list(info.chunk_crc32[start:stop]) != list(crc32s):
            raise CheckpointMismatch(
                f"input {name!r}: chunks {start}..{stop - 1} changed in {store_path} while reduce ran")
        part = Partial.empty(info.n, dev, with_gram)
        with ChunkPrefetcher(lambda i: store.read_chunk(name, i), start, stop, depth=2, threads=1,
                             pin=dev.type == "cuda") as chunks:
            delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
            for a, b in plan_groups(start, stop, g):
                fold_group(part, chunks.take(b - a), name=name, n=info.n, dtype=DTYPES[dtype],
                           device=dev)
                if delay:
                    time.sleep(delay)
    return part.to("cpu")


def merge_task(a: Partial, b: Partial) -> Partial:
    """TSQR merge of two neighbouring ranges' partials (``merge_r`` on the R's)."""
    return merge_partials(a, b)


def _nothing(name: str) -> None:
    return None


def _limit_worker_threads() -> None:
    """Inside a Dask worker, let torch use the worker's threads, not every core."""
    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, int(get_worker().state.nthreads)))
    except (ImportError, ValueError, AttributeError):
        pass


def _dask_client(cfg: ReduceConfig):
    from distributed import Client, LocalCluster

    if cfg.scheduler is not None:
        try:
            return Client(cfg.scheduler, timeout="30s"), None
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"scheduler: cannot reach a Dask scheduler at {cfg.scheduler!r} ({exc})") from exc
    cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


# -- progress -------------------------------------------------------------------------------------


def _chunk_bytes(info, i: int) -> int:
    a, b = info.chunk_rows(i)
    return (b - a) * info.n * torch.empty(0, dtype=info.dtype).element_size()


class _Progress:
    """tqdm bars in bytes of stored activations: overall (this run's work) and the current input.

    ``disable=None`` when enabled: bars show on a terminal only, not in logs.
    """

    def __init__(self, store, names, enabled: bool):
        from tqdm.auto import tqdm

        self._tqdm, self._disable = tqdm, None if enabled else True
        total = sum(_input_bytes(store.input(n)) for n in names)
        self.overall = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000,
                            desc=f"reduce {len(names)} inputs", position=0, disable=self._disable)
        self.current = None
        self._count, self._inputs = 0, len(names)

    def begin(self, job, per_input: bool = True) -> None:
        """A new input: what earlier runs folded leaves the overall total; a bar of its own."""
        self._count += 1
        last = job.info.num_chunks if job.action == "skipped" else job.start
        done = sum(_chunk_bytes(job.info, i) for i in range(last))
        self.overall.total -= done
        self.overall.refresh()
        if self.current is not None:
            self.current.close()
            self.current = None
        if per_input and job.action != "skipped":
            self.current = self._tqdm(
                total=_input_bytes(job.info), initial=done, unit="B", unit_scale=True,
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


def _input_bytes(info) -> int:
    return info.tokens * info.n * torch.empty(0, dtype=info.dtype).element_size()


def _reason(exc: Exception) -> str:
    """The part of a prepare_block message after its 'name: ' prefix."""
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


__all__ = ["ReduceConfig", "run_reduce", "fold_group", "merge_partials", "plan_groups",
           "group_chunks", "ChunkPrefetcher", "Partial", "config_help"]
