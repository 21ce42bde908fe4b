"""Reduce on Dask: group-aligned chunk ranges fold on workers, partial R's merge in a tree.

Tasks are pure functions of their arguments (they open the store by path), so
Dask may rerun them when a worker is lost. Checkpointing is per input: the
result file is written when an input's tree finishes (a partial checkpoint of a
local run is merged in). The result equals the local R to working precision,
not bit for bit. Scripts that start a local cluster need the usual
``if __name__ == "__main__":`` guard: Dask starts worker processes with spawn.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..devices import resolve_device
from ..errors import CheckpointMismatch, UsageError
from .bars import Bars, chunk_bytes
from .config import DTYPES, TEST_DELAY_ENV, ReduceConfig
from .fold import Partial, fold_group, merge_partials, plan_groups
from .prefetch import ChunkPrefetcher


def fold_on_dask(run, names: list[str]) -> dict:
    """All inputs' trees submitted at once; each result file is written as its tree finishes.
    ``run`` is the local driver's run (`local.Run`): jobs, saving, the lock and the stop flag."""
    from distributed import as_completed

    out, pending = {}, {}
    client, cluster = _dask_client(run.cfg)
    try:
        with Bars(run.store, names, enabled=run.progress) as bars:
            nworkers = max(1, len(client.scheduler_info().get("workers", {})))
            for name in names:
                job = run.job(name)
                bars.begin(job, per_input=False)  # all inputs fold at once: overall bar only
                if job.action == "skipped":
                    out[name] = run.summary(job, job.seconds)
                else:
                    pending[_submit_tree(client, run, job, nworkers)] = (job, time.monotonic())
            finished = as_completed(list(pending))
            while pending:
                if run.stop:
                    left = ", ".join(job.name for job, _ in pending.values())
                    run.stop.check(f"with inputs still folding on Dask ({left}); finished inputs are "
                                   f"saved, the others restart from their last checkpoint")
                run.lock.check()
                if not finished.has_ready():
                    time.sleep(0.05)  # poll, so a signal is seen while Dask works
                    continue
                for fut in finished.next_batch(block=False):
                    job, t0 = pending.pop(fut)
                    out[job.name] = _finish_tree(run, job, fut.result(),
                                                 job.seconds + time.monotonic() - t0)
                    bars.update(sum(chunk_bytes(job.info, i)
                                    for i in range(job.start, job.info.num_chunks)))
    finally:
        for fut in pending:
            fut.cancel()
        client.close()
        if cluster is not None:
            cluster.close()
    return {name: out[name] for name in names}


def _submit_tree(client, run, job, nworkers: int):
    """Future of the Partial of the job's chunks: group-aligned ranges folded on workers,
    merged pairwise (a binary tree keeping the rows' order)."""
    info, g = job.info, job.settings["group_chunks"]
    groups = plan_groups(job.start, info.num_chunks, g)
    if not groups:
        return client.submit(_nothing, job.name, pure=True)
    per = math.ceil(len(groups) / min(len(groups), 2 * nworkers))  # ~2 ranges per worker
    ranges = [(groups[i][0], groups[min(i + per, len(groups)) - 1][1])
              for i in range(0, len(groups), per)]
    cfg = run.cfg
    level = [client.submit(fold_range_task, str(run.store.path), job.name, a, b,
                           list(info.chunk_crc32[a:b]), g, cfg.dtype, cfg.device, cfg.with_gram,
                           pure=True)
             for a, b in ranges]
    while len(level) > 1:
        level = [client.submit(merge_task, *level[i:i + 2], pure=True) if i + 1 < len(level)
                 else level[i] for i in range(0, len(level), 2)]
    return level[0]


def _finish_tree(run, job, result: Partial | None, seconds: float) -> dict:
    """Merge a finished tree after the checkpointed state and write the result file."""
    if result is not None:
        job.part = merge_partials(job.part, result)
    if job.part.R is None:
        job.part.R = torch.zeros(0, job.info.n, dtype=run.dtype)
    run.save(job, job.info.num_chunks, seconds)
    return run.summary(job, seconds)


def fold_range_task(store_path: str, name: str, start: int, stop: int, crc32s: list[int],
                    g: int, dtype: str, device: str, with_gram: bool) -> Partial:
    """Partial (on CPU) of chunks [start, stop) of one input, folded in the same groups as locally.

    ``crc32s`` (the store's checksums of those chunks when the run began)
    make the task's identity follow the data; a store changed since refuses.
    """
    from ..store import open_store

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
