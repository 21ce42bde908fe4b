"""The block-by-block run: capture one decoder block at a time, and propagation.

This is an orchestrator above capture, reduce and solve: it uses their public
functions only (the chunk buffers, writer and probe of `capture`, `run_reduce`
and the fold kernel of `reduce`, `factor_layers` of `solve`).

For models larger than device memory or RAM. The model is built on the ``meta``
device (shapes, no memory); then

1. *embeddings*: only the input embeddings (and the rotary embedding) are
   materialised; the hidden states entering block 0 of every calibration sample
   are computed batch by batch and written to a Zarr array on disk;
2. *block k* = 0, 1, ...: only block k's weights are read from the safetensors
   checkpoint (`weights.LazyWeights`) onto the device; all samples go through it
   in the batches the ordinary capture uses, with the same hooks, chunk buffers,
   writer thread and commits (`capture.writer`), and its outputs, the hidden states
   entering block k+1, are written to the other Zarr array (the two arrays are
   ping-ponged: block k reads one and writes the other). The block is freed
   (back to ``meta``) before the next one is loaded;
3. *finish*: the last, partial chunk of every input (kept aside per block, see
   below) is written and the store is committed complete.

Every decoder layer is called exactly as the model's own forward calls it: the
keyword arguments (causal mask, ``position_embeddings`` = the rotary (cos, sin),
``position_ids``, ...) are recorded by running the base model's own ``forward``
with each layer replaced by a stand-in that records what it is given (GPTQ's
"catcher"), once per batch shape. So masks and rotary embeddings come from the
installed transformers' code, whatever its signature, per layer (sliding-window
layers of Qwen2/Mistral get theirs). With the same batches, the stored
activations are bit-identical to the ordinary capture's on the same device.

GGUF models (and checkpoints that are not safetensors) cannot be read per block:
they are loaded whole on the CPU once, and only one block at a time is moved to
the device (peak device memory is still one block; RAM holds the model).

Work directory (``--hidden-dir``, default ``OUT.sequential``, deleted when the
capture completes)::

    progress.json          {format, store_uuid, next_block, src, probe_crc32}, atomic
    hidden.zarr/a, /b      (samples x seq_len x hidden) in the model dtype (bf16/fp16 as
                           uint16 bits), one chunk per sample; attributes
                           {block: k whose output it holds (-1: embeddings), samples: rows valid}
    pending/<input>.safetensors   the last, partial chunk of an input (atomic)

Resume: ``progress.json`` names the next block and which array holds its input
(written after that array's ``samples`` attribute says it is complete). Within
a block, the store's committed chunks of its inputs and the output array's
``samples`` tell where to go on; batches before the committed chunks run again
only if their output was not written, and capture nothing twice. The store's
root ``capture.samples_done`` stays 0 until the final commit (it counts samples
committed for *every* input); each input's ``committed_tokens`` shows progress.

Propagation (``--propagate``, with ``--ratio F`` or ``--rank N``, ``--method``, ``--mu``):
each block is compressed as soon as its inputs are known, and the blocks after it
see the activations of the compressed model (the idea of SVD-LLM's parameter
update and of sequential GPTQ). Block k then takes these steps:

1. *capture pass*: all samples through block k as it is (uncompressed), on the
   hidden states the compressed blocks 0..k-1 produced; its inputs go to the store
   as above (the last, partial chunk to ``pending/``); the forward stops after the
   last hooked linear;
2. *reduce*: ``reduce.run_reduce`` on the store, restricted to block k's inputs (so
   it takes the store's reduce lock, and a concurrent ``coala-stream reduce`` is
   refused), folds their committed chunks into ``reduce/<input>.safetensors``; the
   pending partial chunk is folded in memory on top, exactly as the final reduce
   will fold it (one more group after a complete result: reduce's "extended");
3. *solve*: ``solve.factor_layers`` (the code of ``coala-stream solve`` with uniform
   ranks: same ranks, same absolute mu, same kept-dense rule) gives A, B for every
   linear of block k from W as the checkpoint stores it and that R;
4. *propagation pass*: each linear's weight becomes ``(A @ B).to(W.dtype)`` (what
   ``solve --format dense`` writes) and all samples go through the compressed block;
   its outputs are block k+1's input (the ping-pong array, as above). The last
   block has no propagation pass.

After the final commit the whole store is reduced (each input's partial chunk is
folded onto its result), so ``coala-stream solve STORE`` with the same ``--ratio``
/ ``--rank``, ``--method``, ``--mu`` and ``--device`` (default cpu: capture on the
same device) computes the very factors used here. The settings are recorded in
the store's ``capture_settings.propagate`` and compared like the other capture
settings, so an ordinary store and a propagated one never resume or stand in for
each other. Later reduce settings other than the defaults (``--dtype float64``,
``--with-gram``, ``--group-rows``) need ``reduce --restart`` and give a slightly
different R; ``solve --allocate global`` or ``--layers`` compress otherwise than
the propagation assumed.

Block-level, not layer-level: the inputs of o_proj and down_proj inside block k are
captured with block k uncompressed (only blocks 0..k-1 are compressed). The strict
sequential-GPTQ order (q/k/v compressed before capturing o_proj's input, ...) would
need one pass per group of linears in every block; the block-level order needs two
passes per block (capture, propagate).

Resume: ``progress.json`` also records ``captured`` (the block whose capture pass
is done); reduce resumes from its own checkpoints, the factors are recomputed
(deterministic), and the propagation pass continues after the output rows written.
A killed run rerun with the same command gives the same store and reduce results.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .. import checkpoint, models, signals
from ..capture import (ChunkBuffer, ChunkWriter, InputGroup, Plan, StopForward, capture_lock,
                       existing_store, linear_input, open_or_create_store, plan_capture, probe_run,
                       run_capture, summary_of)
from ..devices import threads_beside_writer, torch_threads
from ..errors import StoreError
from ..progress import bar as progress_bar
from ..signals import StopRequests
from .blocks import BlockModel
from .config import SequentialConfig
from .passes import capture_block, finish
from .propagate import propagate_block, reduce_inputs
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
    (this run's)."""
    config.check()
    outer = torch.get_num_threads()
    with capture_lock(config.out), torch_threads(threads_beside_writer(
            config.threads, config.resolved_device(), config.resolved_writers())):
        return _run_sequential(config, progress, outer)


def _run_sequential(config: SequentialConfig, progress: bool, compute_threads: int) -> dict:
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with models.gguf_parsed_once():
        plan = plan_capture(config, config.extra_settings())
        plan.compute_threads = compute_threads
        summary = {**summary_of(config, plan), "sequential": True}
        state = existing_store(config, plan.backend, plan.attrs)
        return _blocks_run(config, plan, state, summary, say, progress, t0)


def _blocks_run(config, plan, state, summary, say, progress, t0) -> dict:
    work = WorkDir(Path(config.hidden_dir) if config.hidden_dir else default_hidden_dir(config.out),
                   config.samples, config.seq_len, plan.dtype)
    propagate = plan.attrs["capture_settings"].get("propagate")
    if state == "complete":
        if propagate:  # a run killed between the final commit and the final reduce
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
                and work.state(rec["src"]) != (rec["next_block"] - 1, config.samples):
            say(f"warning: {work.path}: the hidden states entering block {rec['next_block']} are "
                f"incomplete although the progress record says otherwise: recomputing them")
            rec = None
        if rec is None or rec.get("store_uuid") != uuid:
            work.reset()  # committed chunks are kept: the blocks run again without capturing them
            rec = {"store_uuid": uuid, "next_block": 0, "src": None, "probe_crc32": {}}
            work.write_progress(rec)
        before = rec["next_block"]
        if state == "resume":
            say(f"{store.path}: resuming at " + (f"block {before} of {last + 1}" if before <= last
                                                 else "the final commit"))
        with StopRequests("capture"):  # every committed chunk and finished block is kept
            sizes = _run_blocks(bm, store, work, rec, targets, last, plan, config, progress, say,
                                summary)
    finally:
        store.close()
    work.remove()
    summary.update(status="complete", samples_before=0, block_before=before, blocks=last + 1,
                   inputs=len(sizes.pop("inputs")), seconds=time.perf_counter() - t0, **sizes)
    return summary


def _run_blocks(bm: BlockModel, store, work: WorkDir, rec: dict, targets: dict, last: int,
                plan: Plan, config: SequentialConfig, progress: bool, say, summary: dict) -> dict:
    samples, seq_len, B = config.samples, config.seq_len, plan.batch_size
    ids = plan.cal.ids
    raw = 0
    propagate = plan.attrs["capture_settings"].get("propagate")
    passes = 2 if propagate else 1  # per block but the last: capture (+ propagate)
    done_passes = (rec["src"] is not None) + passes * rec["next_block"] \
        + (propagate is not None and rec.get("captured") == rec["next_block"])
    bar = progress_bar((1 + passes * last + 1) * samples, initial=done_passes * samples,
                       unit="sample", desc="capture --sequential" + (" --propagate" if propagate else ""),
                       enabled=progress, dynamic_ncols=True)
    timing = {"reduce_seconds": 0.0, "solve_seconds": 0.0, "compressed_layers": 0}
    try:
        if rec["src"] is None:  # embeddings -> array a
            bar.set_postfix_str("embeddings", refresh=False)
            with torch.no_grad():
                for s in range(0, samples, B):
                    work.write("a", s, bm.embed(ids[s:s + B]), block=-1)
                    bar.update(min(B, samples - s))
            bm.free_embeddings()
            rec.update(next_block=0, src="a")
            work.write_progress(rec)
        bm.free_embeddings()
        for k in range(rec["next_block"], last + 1):
            bar.set_postfix_str(f"block {k}/{last}", refresh=False)
            src, dst = rec["src"], ("b" if rec["src"] == "a" else "a")
            bm.load_block(k)
            try:
                if not propagate:
                    raw += capture_block(bm, k, store, work, src, dst, targets.get(k, []),
                                          k != last, rec, plan, config, bar, say)
                else:
                    raw += propagate_block(bm, k, store, work, src, dst, targets.get(k, []),
                                            k == last, rec, plan, config, bar, say, timing)
            finally:
                bm.free_block(k)
            rec.update(next_block=k + 1, src=rec["src"] if k == last else dst)
            rec.pop("captured", None)
            work.write_progress(rec)  # after dst's count: the next block may start
            signals.check("capture", f"after block {k} (progress saved in {work.path})")
        bar.set_postfix_str("final commit", refresh=False)
        names, last_raw = finish(store, work, samples, seq_len)
        raw += last_raw
        if propagate:  # every input's last, partial chunk onto its result: the store is reduced
            t = time.perf_counter()
            reduce_inputs(config, plan, None)
            timing["reduce_seconds"] += time.perf_counter() - t
            summary["propagate"].update(timing)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    return {"inputs": names, "raw_bytes": raw,
            "store_raw_bytes": sum(store.input(n).n for n in names) * samples * seq_len
            * getattr(torch, plan.dtype).itemsize,
            "stored_bytes": sum(store.stored_bytes(n) for n in names)}
