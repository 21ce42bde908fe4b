"""`run_capture`: the whole model forward over the calibration windows, inputs to the store.

1. `plan_capture` resolves the model config, tokenizer and calibration windows and
   the store attributes (cheap: no weights); `settings.existing_store` compares
   them with a store already at ``--out``: resume, no-op if complete, or refuse.
2. The model is loaded. A probe forward on sample 0 (`probe.probe_groups`) finds
   which hooked ``nn.Linear`` modules read the same tensor: one store array per group.
3. Batches run forward; a forward pre-hook on each group's first consumer copies
   its input rows into a chunk buffer; full chunks go to the writer threads
   (`writer.ChunkWriter`), and a commit is queued once every input has its chunk k.
   The forward stops right after the last hooked module.

Chunk rule: ``chunk_tokens`` is a multiple of ``seq_len`` and the batch size
divides ``chunk_tokens / seq_len``, so every commit point is a whole number of
samples and a resumed run replays exactly the batches of an uninterrupted one:
killed-and-resumed writes the same bytes. A signal is acted on between batches
(`signals.StopRequests`): no commit is queued after it, queued ones finish, exit 75.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import calib, models
from ..devices import torch_threads
from ..errors import READ_ONLY, StoreError, UsageError, write_error
from ..signals import StopRequests
from ..store import create_store, open_store
from .config import CaptureConfig
from .probe import InputGroup, StopForward, forward, linear_input, linear_targets, probe_groups
from .settings import (capture_lock, capture_threads, check_not_in_use, existing_store,
                       lock_path, prepare_inputs, store_attrs)
from .writer import ChunkBuffer, ChunkWriter


@dataclass
class Plan:
    """Everything resolved before the model is loaded (cheap: config, tokenizer, text)."""

    chunk_tokens: int
    batch_size: int
    backend: str
    device: torch.device
    dtype: str
    model_config: object
    cal: calib.Calibration
    attrs: dict
    writers: int = 1
    # torch threads for work done while the writer is idle (--propagate's reduce and solve):
    # the caller's, so `coala-stream solve` run afterwards computes the same factors bit for bit
    compute_threads: int | None = None


def plan_capture(config: CaptureConfig, extra_settings: dict | None = None) -> Plan:
    """Resolve and check everything but the weights; ``extra_settings`` go into the store's
    ``capture_settings`` (an orchestrator's: sequential, propagate)."""
    config.check()
    part = config.shard_part()
    if part is not None and (extra_settings or {}).get("sequential"):
        raise UsageError("--shard with --sequential is not supported yet: capture each part "
                         "without --sequential, or the whole calibration with it")
    # bad data fails here, before any model is loaded
    data = calib.read_data(config.data, config.text_field, config.chat_template)
    chunk_tokens, batch_size = config.resolved_chunk_tokens(), config.resolved_batch_size()
    backend, device = config.resolved_backend(), config.resolved_device()
    cfg = models.load_config(config.model)
    dtype = models.resolve_dtype(config.dtype, cfg, config.model)
    tokenizer = models.load_tokenizer(config.model)
    cal = calib.calibration_windows(tokenizer, data, config.samples, config.seq_len,
                                    config.seed, models.max_positions(cfg),
                                    bos=calib.bos_token(tokenizer, config.bos))
    if part is not None:  # the whole draw first, so every part comes from the same windows
        cal = calib.shard_calibration(cal, *part)
    attrs = store_attrs(config, cfg, tokenizer, cal, dtype, chunk_tokens, batch_size, device,
                        extra_settings)
    return Plan(chunk_tokens, batch_size, backend, device, dtype, cfg, cal, attrs,
                writers=config.resolved_writers())


def run_capture(config: CaptureConfig, progress: bool = True) -> dict:
    """Capture (or resume capturing) ``config.out``; returns a summary dict.

    Summary keys: store, backend, status ("complete" or "already complete"),
    samples, seq_len, tokens, samples_before (committed before this run), inputs,
    dtype, device, chunk_tokens, batch_size, seconds, raw_bytes (written by this
    run), store_raw_bytes and stored_bytes (the whole store, uncompressed and on disk).
    Raises UsageError / CoalaError / StoreError for user-fixable problems, LockedError
    while another capture writes the store, and Interrupted on SIGINT/SIGTERM
    (everything committed is kept; rerun resumes).
    """
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    lock = capture_lock(config.out)
    try:
        lock.acquire()
    except OSError as exc:  # a read-only location: fine for a store with nothing left to do
        return complete_without_lock(config, exc)
    try:
        forward, compute = capture_threads(config, torch.get_num_threads(), say)
        with torch_threads(forward):
            return _run_capture(config, progress, compute)
    finally:
        lock.release()


def complete_without_lock(config: CaptureConfig, exc: OSError, extra_settings=None,
                          **summary) -> dict:
    """The "already complete" summary of the store at ``config.out`` when its capture lock
    cannot be created (a read-only mount, no permission) but nothing needs writing: the
    store is complete with this run's settings. Otherwise ``exc`` as a one-line WriteError."""
    if exc.errno in READ_ONLY:
        with models.gguf_parsed_once():
            plan = plan_capture(config, extra_settings)
        if existing_store(config, plan.backend, plan.attrs) == "complete":
            return {**summary_of(config, plan), **summary, "status": "already complete",
                    "samples_before": len(plan.cal.ids), "raw_bytes": 0, "seconds": 0.0}
    raise write_error(exc, lock_path(config.out)) from exc


def _run_capture(config: CaptureConfig, progress: bool, compute_threads: int) -> dict:
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with models.gguf_parsed_once():  # config, tokenizer and weights from one GGUF parse
        plan = plan_capture(config)
        plan.compute_threads = compute_threads
        plan.attrs["capture_settings"]["compute_threads"] = compute_threads  # what a resume keeps
        summary = summary_of(config, plan)
        state = existing_store(config, plan.backend, plan.attrs)
        if state == "complete":
            summary.update(status="already complete", samples_before=summary["samples"],
                           raw_bytes=0, seconds=time.perf_counter() - t0)
            return summary
        say(f"loading {config.model.describe()} ({plan.dtype}, {plan.device}) ...")
        model = models.load_model(config.model, plan.dtype, plan.device, config=plan.model_config,
                                  progress=progress)
    groups, fire_order, probe_crc = probe_groups(
        model, linear_targets(model, config.layers), plan.cal.ids[:1].to(plan.device),
        getattr(torch, plan.dtype))
    plan.attrs["capture_settings"]["probe_crc32"] = probe_crc
    store = _open_for_writing(config, plan, state, probe_crc, say)
    try:
        samples_done = int(store.attrs["capture"]["samples_done"])
        prepare_inputs(store, groups, samples_done)
        crcs = {g.name: committed_crcs(store, g.name, samples_done * config.seq_len)
                for g in groups}
        sizes = _capture_loop(model, store, groups, fire_order[-1], plan, samples_done, crcs,
                              progress)
    finally:
        store.close()
    summary.update(status="complete", samples_before=samples_done, inputs=len(groups),
                   seconds=time.perf_counter() - t0, **sizes)
    return summary


def summary_of(config: CaptureConfig, plan: Plan) -> dict:
    samples = len(plan.cal.ids)  # this shard's part with --shard
    return {"store": str(config.out), "backend": plan.backend, "samples": samples,
            "seq_len": config.seq_len, "tokens": samples * config.seq_len,
            "dtype": plan.dtype, "device": str(plan.device), "writers": plan.writers,
            "threads": torch.get_num_threads(),  # the forward's, inside run_capture's setting
            "chunk_tokens": plan.chunk_tokens, "batch_size": plan.batch_size}


def open_or_create_store(config: CaptureConfig, plan: Plan, state: str | None):
    """A new store (replacing what is there, unless a reduce holds it), or the existing one
    rolled back to its last commit. Call while holding the capture lock."""
    if state is None:
        check_not_in_use(Path(config.out))
        shards = {} if config.shard_chunks is None else {"shard_chunks": config.shard_chunks}
        return create_store(config.out, plan.backend, plan.attrs, overwrite=True, **shards)
    store = open_store(config.out, "r+")
    try:
        store.rollback()
    except BaseException:
        store.close()
        raise
    return store


def _open_for_writing(config: CaptureConfig, plan: Plan, state: str | None, probe_crc: int, say):
    """`open_or_create_store`; on resume, warns if the model computes other bits than when
    the store was started."""
    store = open_or_create_store(config, plan, state)
    if state is None:
        return store
    attrs = store.attrs
    if attrs.get("capture_settings", {}).get("probe_crc32") not in (None, probe_crc):
        say("warning: the model's activations on sample 0 differ from those recorded when this "
            "store was started (other weights, device or library versions?): the resumed part "
            "will not be bit-identical to an uninterrupted run")
    say(f"{store.path}: resuming after {attrs['capture']['samples_done']} of "
        f"{attrs['calibration']['samples']} samples")
    return store


def committed_crcs(store, name: str, tokens: int) -> list[int]:
    info = store.input(name)
    if info.tokens != tokens:
        raise StoreError(f"{store.path}: input {name} holds {info.tokens} committed rows, but the "
                         f"store's samples_done says {tokens}; the store is inconsistent "
                         f"(--overwrite starts over)")
    return list(info.chunk_crc32)


def _capture_loop(model, store, groups: list[InputGroup], last: str, plan: Plan, start: int,
                  crcs: dict[str, list[int]], progress: bool) -> dict:
    """Hook the group leaders and run the batches from sample ``start``.
    Returns byte counts: this run's raw bytes, the whole store's raw and stored bytes."""
    from ..progress import bar as progress_bar

    dtype = getattr(torch, plan.dtype)
    first_chunk = start * plan.cal.ids.shape[1] // plan.chunk_tokens
    buffers = {g.name: ChunkBuffer(plan.chunk_tokens, g.n, dtype, first_chunk) for g in groups}
    writer = ChunkWriter(store, crcs, {g.name: g.n for g in groups}, dtype.itemsize, plan.writers)

    def hook(name):
        def pre_hook(mod, args, kwargs):
            x = linear_input(args, kwargs)
            for index, chunk in buffers[name].add(x.reshape(-1, x.shape[-1])):
                writer.put(("chunk", name, index, chunk))
            if name == last:
                raise StopForward  # nothing after this module is needed
        return pre_hook

    mods = dict(model.named_modules())
    handles = [mods[g.name].register_forward_pre_hook(hook(g.name), with_kwargs=True) for g in groups]
    bar = progress_bar(len(plan.cal.ids), "capture", "sample", enabled=progress, initial=start,
                       dynamic_ncols=True)
    try:
        with StopRequests("capture") as stop:
            try:
                _run_batches(model, plan, start, buffers, writer, bar, stop)
            finally:
                writer.close()  # finish queued commits; a writer error (disk full) wins
            stop.check(f"with {writer.samples_committed or start} samples of {store.path} "
                       f"committed")
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return {"raw_bytes": writer.raw_bytes, "store_raw_bytes": writer.committed_raw,
            "stored_bytes": writer.stored_bytes}


def _run_batches(model, plan: Plan, start: int, buffers: dict[str, ChunkBuffer],
                 writer: ChunkWriter, bar, stop) -> None:
    """Forward batches from sample ``start``; queue a commit whenever a chunk of every
    input is complete (every ``chunk_tokens / seq_len`` samples), the rest at the end.
    After a signal no further commit is queued (the batches since the last one are redone)."""
    ids = plan.cal.ids
    samples, seq_len = ids.shape
    per_chunk = plan.chunk_tokens // seq_len
    committed = start // per_chunk
    with torch.no_grad():
        for s in range(start, samples, plan.batch_size):
            forward(model, ids[s:s + plan.batch_size].to(plan.device))
            done = min(s + plan.batch_size, samples)
            while (committed + 1) * per_chunk <= done:
                if stop:
                    return
                committed += 1
                writer.put(("commit", committed * per_chunk, committed * plan.chunk_tokens,
                            committed * per_chunk == samples))
            bar.update(done - bar.n)
            bar.set_postfix_str(_postfix(writer, done * seq_len), refresh=False)
            if stop:
                return
    if stop:
        return
    partial = {name: b.flush() for name, b in buffers.items()}
    if committed * per_chunk < samples:  # a last, partial chunk (or nothing run: resume at the end)
        for name, p in partial.items():
            if p is not None:
                writer.put(("chunk", name, *p))
        writer.put(("commit", samples, samples * seq_len, True))


def _postfix(writer: ChunkWriter, tokens: int) -> str:
    stored = writer.stored_bytes
    ratio = f", ratio {writer.committed_raw / stored:.2f}" if stored else ""
    return f"{tokens} tokens, {stored / 1e6:.1f} MB written{ratio}"
