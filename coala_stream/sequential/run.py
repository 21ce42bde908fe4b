"""The block-by-block run: capture one decoder block at a time, with or without propagation.

An orchestrator above capture, reduce and solve: it uses their public functions only.
The model is built on the ``meta`` device; the embeddings, then one decoder block at a
time, are materialised (`blocks.BlockModel`), and the hidden states between blocks live
on disk (`workdir.WorkDir`). Without ``--propagate`` each block's pass captures its
inputs exactly as the ordinary capture would (`passes.capture_block`); with it, each
block is compressed group by group as its inputs become known (`propagate`). The
stages, the work directory, resume and the store they leave are described in
docs/design.md ("Sequential capture and propagation").
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .. import applied, models, signals
from ..capture import (capture_lock, capture_threads, complete_without_lock, existing_store,
                       open_or_create_store, plan_capture, run_capture, summary_of)
from ..devices import torch_threads
from ..progress import bar as progress_bar
from ..signals import StopRequests
from ..blocks import BlockModel
from .config import SequentialConfig
from .context import SequentialRun
from .passes import capture_block, finish
from .propagate import add_cpu, propagate_block, reduce_inputs
from .workdir import WorkDir, default_hidden_dir


def run(config: SequentialConfig, progress: bool = True) -> dict:
    """What `coala-stream capture` does: `run_sequential` with ``--sequential``, else the
    ordinary `capture.run_capture`. Usage errors first, before anything is loaded."""
    config.check()
    if config.sequential:
        return run_sequential(config, progress)
    return run_capture(config, progress)


def run_sequential(config: SequentialConfig, progress: bool = True) -> dict:
    """`capture.run_capture` one decoder block at a time; same summary keys plus
    ``blocks`` (blocks run) and ``block_before`` (the block a resumed run started at);
    with ``--propagate``, ``propagate``: the settings (method, ratio, rank, mu) and, for
    a run that got to the end, ``compressed_layers``, ``reduce_seconds``, ``solve_seconds``
    (this run's; wall), and the same as CPU seconds of this process (``reduce_cpu_seconds``,
    ``solve_cpu_seconds``, ``refine_cpu_seconds``; ``cpu_seconds``: the blocks' loop and final
    commit and reduce, model loading excluded)."""
    config.check()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    lock = capture_lock(config.out)
    try:
        lock.acquire()
    except OSError as exc:  # a read-only location: fine for a store with nothing left to do
        return complete_without_lock(config, exc, config.extra_settings(), sequential=True)
    try:  # a resumed run keeps the thread counts its store recorded when it was started
        forward, compute = capture_threads(config, torch.get_num_threads(), say)
        with torch_threads(forward):
            return _run_sequential(config, progress, compute)
    finally:
        lock.release()


def _run_sequential(config: SequentialConfig, progress: bool, compute_threads: int) -> dict:
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with models.gguf_parsed_once():
        plan = plan_capture(config, config.extra_settings())
        plan.compute_threads = compute_threads
        plan.attrs["capture_settings"]["compute_threads"] = compute_threads  # what a resume keeps
        summary = {**summary_of(config, plan), "sequential": True}
        state = existing_store(config, plan.backend, plan.attrs)
        return _blocks_run(config, plan, state, summary, say, progress, t0)


def _blocks_run(config, plan, state, summary, say, progress, t0) -> dict:
    work = WorkDir(Path(config.hidden_dir) if config.hidden_dir else default_hidden_dir(config.out),
                   config.samples, config.seq_len, plan.dtype)
    propagate = plan.attrs["capture_settings"].get("propagate")
    if state == "complete":
        if propagate or config.drop_activations:  # killed between the final commit and reduce
            reduce_inputs(config, plan, None)
        work.remove()
        summary.update(status="already complete", samples_before=config.samples, raw_bytes=0,
                       seconds=time.perf_counter() - t0)
        return summary
    if state is None:
        work.reset()  # refuses a foreign directory before the store is replaced
    if propagate:
        summary["propagate"] = dict(propagate)
    say(f"loading {config.model.describe()} block by block ({plan.dtype}, {plan.device}) ...")
    bm = BlockModel(config.model, plan.model_config, plan.dtype, plan.device, progress, say)
    targets = bm.block_targets(config.layers)
    last = max(targets)
    store = open_or_create_store(config, plan, state)
    try:
        uuid = store.attrs["uuid"]
        rec = work.read_progress()
        if rec is not None and rec.get("store_uuid") == uuid and rec["src"] is not None \
                and rec["next_block"] <= last \
                and any(work.state(a) != (rec["next_block"] - 1, config.samples)
                        for a in (rec["src"], rec.get("osrc")) if a is not None):
            say(f"warning: {work.path}: the hidden states entering block {rec['next_block']} are "
                f"incomplete although the progress record says otherwise: recomputing them")
            rec = None
        if rec is None or rec.get("store_uuid") != uuid:
            work.reset()  # committed chunks are kept: the blocks run again without capturing them
            rec = {"store_uuid": uuid, "next_block": 0, "src": None, "probe_crc32": {}}
            work.write_progress(rec)
        before = rec["next_block"]
        if propagate and state == "resume":  # a damaged factors file is found now, not at the end
            applied.check_blocks(store, before=before)
        if state == "resume":
            say(f"{store.path}: resuming at " + (f"block {before} of {last + 1}" if before <= last
                                                 else "the final commit"))
        ctx = SequentialRun(bm, store, work, rec, plan, config, say, {}, None)
        with StopRequests("capture"):  # every committed chunk and finished block is kept
            sizes = _run_blocks(ctx, targets, last, progress, summary)
    finally:
        store.close()
    work.remove()
    summary.update(status="complete", samples_before=0, block_before=before, blocks=last + 1,
                   inputs=len(sizes.pop("inputs")), seconds=time.perf_counter() - t0, **sizes)
    return summary


def _run_blocks(ctx: SequentialRun, targets: dict, last: int, progress: bool,
                summary: dict) -> dict:
    bm, store, work, rec, plan, config = ctx.bm, ctx.store, ctx.work, ctx.rec, ctx.plan, ctx.config
    samples, seq_len, B = config.samples, config.seq_len, plan.batch_size
    raw = 0
    propagate = plan.attrs["capture_settings"].get("propagate")
    if propagate:  # a block is many passes (one per group, then one or two more): count blocks
        bar = progress_bar(last + 2, initial=(rec["src"] is not None) + rec["next_block"],
                           unit="block", desc="capture --sequential --propagate",
                           enabled=progress, dynamic_ncols=True)
    else:
        done = (rec["src"] is not None) + rec["next_block"]
        bar = progress_bar((last + 2) * samples, initial=done * samples, unit="sample",
                           desc="capture --sequential", enabled=progress, dynamic_ncols=True)
    ctx.bar, timing = bar, ctx.timing
    timing.update(reduce_seconds=0.0, solve_seconds=0.0, compressed_layers=0)
    cpu0 = time.process_time()
    try:
        if rec["src"] is None:  # embeddings -> array a
            bar.set_postfix_str("embeddings", refresh=False)
            with torch.no_grad():
                for s in range(0, samples, B):
                    work.write("a", s, bm.embed(plan.cal.ids[s:s + B]), block=-1)
                    if not propagate:
                        bar.update(min(B, samples - s))
            rec.update(next_block=0, src="a")
            work.write_progress(rec)
            if propagate:
                bar.update(1)
        bm.free_embeddings()
        for k in range(rec["next_block"], last + 1):
            bar.set_postfix_str(f"block {k}/{last}", refresh=False)
            bm.load_block(k)
            try:
                if not propagate:
                    src, dst = rec["src"], ("b" if rec["src"] == "a" else "a")
                    raw += capture_block(ctx, k, src, dst, targets.get(k, []), k != last)
                    rec.update(next_block=k + 1, src=src if k == last else dst)
                else:
                    raw += propagate_block(ctx, k, targets.get(k, []), k == last)
                    bar.update(1)
            finally:
                bm.free_block(k)
            work.write_progress(rec)  # after dst's count: the next block may start
            signals.check("capture", f"after block {k} (progress saved in {work.path})")
        bar.set_postfix_str("final commit", refresh=False)
        names, last_raw = finish(store, work, samples, seq_len)
        raw += last_raw
        if propagate or config.drop_activations:  # the last, partial chunks onto the results:
            t, c = time.perf_counter(), time.process_time()  # the store ends reduced
            reduce_inputs(config, plan, None)
            timing["reduce_seconds"] += time.perf_counter() - t
            add_cpu(timing, "reduce_cpu_seconds", c)
            timing["cpu_seconds"] = time.process_time() - cpu0
            if propagate:
                summary["propagate"].update(timing)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    itemsize = getattr(torch, plan.dtype).itemsize
    return {"inputs": names, "raw_bytes": raw,
            "store_raw_bytes": sum(store.input(n).n for n in names) * samples * seq_len * itemsize,
            "stored_bytes": sum(store.stored_bytes(n) for n in names)}
