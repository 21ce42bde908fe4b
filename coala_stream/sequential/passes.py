"""The passes of a block: all samples through block k, capturing its inputs and/or writing its
outputs (`capture_block`), and the final commit of every input's last chunk (`finish`)."""

from __future__ import annotations

import torch

from .. import checkpoint, signals
from ..capture import ChunkBuffer, ChunkWriter, InputGroup, Plan, StopForward, linear_input, probe_run
from ..errors import StoreError
from ..blocks import BlockModel
from .context import SequentialRun
from .infold import GroupFold, reduce_config
from .workdir import WorkDir


def capture_block(ctx: SequentialRun, k: int, src: str, dst: str, targets: list,
                  write_output: bool) -> int:
    """All samples through block ``k`` (loaded), capturing the inputs of ``targets`` and,
    with ``write_output``, writing its outputs to ``dst`` (without, the forward stops after
    the last hooked linear); returns raw bytes written. Resumes after the committed chunks
    and the output rows written (by an earlier run)."""
    bm, store, work, plan, config, bar = ctx.bm, ctx.store, ctx.work, ctx.plan, ctx.config, ctx.bar
    samples, seq_len, B = config.samples, config.seq_len, plan.batch_size
    groups, fire_order = probe_block(ctx, k, src, targets)
    dtype = getattr(torch, plan.dtype)
    for g in groups:
        store.create_input(g.name, g.n, g.consumers)  # idempotent; StoreError if it differs
    folds = _open_folds(store, groups, plan) if config.drop_activations else None
    infos = {g.name: store.input(g.name) for g in groups}
    cap_start, start = _resume_point(bm, k, store, work, infos, dst, write_output, samples,
                                     seq_len, B, uneven=folds is not None)
    bar.update(min(start, samples))
    if start >= samples:
        return 0
    per_chunk = plan.chunk_tokens // seq_len

    first_chunk = cap_start * seq_len // plan.chunk_tokens
    buffers = {g.name: ChunkBuffer(plan.chunk_tokens, g.n, dtype, first_chunk) for g in groups}
    writer = None
    if folds is None:
        crcs = {g.name: list(infos[g.name].chunk_crc32) for g in groups}
        writer = ChunkWriter(store, crcs, {g.name: g.n for g in groups}, dtype.itemsize,
                             plan.writers)
        sink = lambda name, index, chunk: writer.put(("chunk", name, index, chunk))  # noqa: E731
    else:
        def sink(name, index, chunk):
            if index >= len(folds[name].crcs):  # an input may have committed further (`uneven`)
                folds[name].add(index, chunk)
    stop_after = fire_order[-1] if (not write_output and fire_order) else None
    feeding = [False]
    handles = _hook_groups(bm, k, groups, buffers, sink, feeding, stop_after)
    done_chunks = cap_start // per_chunk
    try:
        with torch.no_grad():
            for s in range(start, samples, B):
                feeding[0] = s >= cap_start  # cap_start is a chunk, hence a batch, boundary
                out = bm.run_block(k, work.read(src, s, s + B).to(bm.device))
                if write_output:
                    work.write(dst, s, out, block=k)
                if signals.requested():
                    break  # no commit after a signal: what follows is redone on resume
                done = min(s + B, samples)
                while writer is not None and feeding[0] and (done_chunks + 1) * per_chunk <= done:
                    done_chunks += 1
                    writer.put(("commit", 0, done_chunks * plan.chunk_tokens, False))
                bar.update(done - s)
            else:
                for fold in (folds or {}).values():
                    fold.flush()  # each input's last group ends at its last whole chunk, as reduce's
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.close()  # finish queued commits; a writer error (disk full) replaces this one
        raise
    finally:
        for h in handles:
            h.remove()
    signals.check("capture", f"in block {k} (every committed chunk is kept)")
    save_pending(work, buffers, k)
    return 0 if writer is None else writer.raw_bytes


def _open_folds(store, groups: list, plan: Plan) -> dict | None:
    """``--drop-activations``: each input's `GroupFold`; None (the block's rows are written, as
    it began) where an input holds rows its reduce result does not cover."""
    folds = {g.name: GroupFold.open(store, g.name, reduce_config(plan)) for g in groups}
    return None if any(f is None for f in folds.values()) else folds


def _hook_groups(bm: BlockModel, k: int, groups: list, buffers: dict, sink, feeding: list,
                 stop_after: str | None) -> list:
    """Pre-hooks on block ``k``'s group leaders: while ``feeding[0]``, their inputs go to the
    chunk buffers and full chunks to ``sink(name, index, chunk)``; the forward stops after
    ``stop_after``."""
    def hook(name):
        def pre_hook(mod, args, kwargs):
            if feeding[0]:
                x = linear_input(args, kwargs)
                for index, chunk in buffers[name].add(x.reshape(-1, x.shape[-1])):
                    sink(name, index, chunk)
            if name == stop_after:
                raise StopForward
        return pre_hook

    mods = dict(bm.blocks[k].named_modules())
    head = f"{bm.prefix}.{k}."
    return [mods[g.name[len(head):]].register_forward_pre_hook(hook(g.name), with_kwargs=True)
            for g in groups]


def _resume_point(bm, k, store, work, infos, dst, write_output, samples, seq_len, B,
                  uneven=False):
    """(first sample to capture, first sample to run) of block ``k``'s pass: after the
    committed chunks (equal for every input of the block; with ``uneven``, in-memory folds
    that commit at their own group boundaries, the fewest) and the output rows written; the
    output array is claimed for block k when it held an older block's output."""
    committed = {i.tokens for i in infos.values()}
    if uneven and committed:
        committed = {min(committed)}
    if len(committed) > 1:
        raise StoreError(f"{store.path}: the inputs of block {k} hold different committed token "
                         f"counts ({sorted(committed)}); the store is inconsistent (--overwrite "
                         f"starts over)")
    cap_start = (committed.pop() if committed else 0) // seq_len  # whole chunks: batch-aligned
    if not infos:
        cap_start = samples
    out_block, out_rows = work.state(dst)
    done_out = samples if not write_output else (out_rows if out_block == k else 0)
    start = (min(cap_start, done_out) // B) * B
    if start < samples and write_output and out_block != k:
        work.claim(dst, k, bm.model.config.hidden_size)  # it held block k-2's output
    return cap_start, start


def save_pending(work: WorkDir, buffers: dict, k: int) -> None:
    """Each input's last, partial chunk, kept aside (atomically) until the final commit: a
    chunk holds chunk_tokens rows except the last one of a finished capture."""
    for name, b in buffers.items():
        p = b.flush()
        if p is not None:
            checkpoint.save_state(work.pending_path(name), {"rows": p[1]},
                                  {"index": p[0], "block": k})


def probe_block(ctx: SequentialRun, k: int, src: str,
                targets: list) -> tuple[list[InputGroup], list[str]]:
    """(groups, their names in forward order) of block ``k`` (loaded, as it runs now), from a
    probe on sample 0 of ``src``; the probe's checksum is recorded in the progress record the
    first time and compared on resume (a warning: the resumed part would not be
    bit-identical)."""
    if not targets:
        return [], []
    bm, work, rec = ctx.bm, ctx.work, ctx.rec
    x0 = work.read(src, 0, 1).to(bm.device)
    groups, fire_order, crc = probe_run(lambda: bm.run_block(k, x0), targets, work.seq_len,
                                        getattr(torch, ctx.plan.dtype))
    old = rec["probe_crc32"].get(str(k))
    if old is not None and old != crc:
        ctx.say(f"warning: block {k}'s activations on sample 0 differ from those recorded when it "
            f"was started (other weights, device or library versions?): the resumed part "
            f"will not be bit-identical to an uninterrupted run")
    if old is None:
        rec["probe_crc32"][str(k)] = crc
        ctx.save()
    return groups, fire_order


def finish(store, work: WorkDir, samples: int, seq_len: int) -> tuple[list[str], int]:
    """Write every input's pending partial chunk, then the one complete commit.
    Returns (input names, raw bytes written)."""
    names = store.inputs
    committed, raw = {}, 0
    for name in names:
        info = store.input(name)
        crcs, tokens = list(info.chunk_crc32), info.tokens
        p = work.pending_path(name)
        if tokens < samples * seq_len:
            if not p.is_file():
                raise StoreError(f"{store.path}: input {name} holds {tokens} of "
                                 f"{samples * seq_len} rows and its last chunk is missing from "
                                 f"{p.parent}; delete {work.path} and rerun to recompute it")
            t, meta = checkpoint.load_state(p)
            if meta.get("index") != len(crcs):
                raise StoreError(f"{p}: pending chunk {meta.get('index')} does not follow the "
                                 f"{len(crcs)} committed chunks of {name}")
            crcs.append(store.write_chunk(name, len(crcs), t["rows"]))
            raw += t["rows"].numel() * t["rows"].element_size()
            tokens += t["rows"].shape[0]
        if tokens != samples * seq_len:
            raise StoreError(f"{store.path}: input {name} would hold {tokens} rows, not "
                             f"{samples * seq_len}; the store is inconsistent (--overwrite)")
        committed[name] = (tokens, crcs)
    store.commit(samples, committed, complete=True)
    return names, raw
