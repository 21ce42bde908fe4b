"""Sequential capture (``coala-stream capture --sequential``): one decoder block at a time.

For models larger than device memory or RAM. The model is built on the ``meta``
device (shapes, no memory); then

1. *embeddings*: only the input embeddings (and the rotary embedding) are
   materialised; the hidden states entering block 0 of every calibration sample
   are computed batch by batch and written to a Zarr array on disk;
2. *block k* = 0, 1, ...: only block k's weights are read from the safetensors
   checkpoint (`models.LazyWeights`) onto the device; all samples go through it
   in the batches the ordinary capture uses, with the same hooks, chunk buffers,
   writer thread and commits (`capture`), and its outputs, the hidden states
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

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, models
from .capture import (CaptureConfig, InputGroup, _ChunkBuffer, _linear_input, _Plan, _Signalled,
                      _signals_as_interrupt, _StopForward, _Writer, linear_targets,
                      open_or_create_store, probe_run)
from .devices import torch_threads
from .errors import CoalaError, Interrupted, StoreError

WORK_FORMAT = "coala-stream/sequential"
SUPPORTED = ("Llama-style decoder models (Llama, Mistral, Qwen2, SmolLM, ...) whose base model "
             "has embed_tokens, a ModuleList `layers` of decoder blocks and rotary_emb")


# ---------------------------------------------------------------------------
# The model as embeddings + blocks

class _Stop(Exception):
    """Raised by the last catcher: the base model's forward has given all it needs."""


class _Catcher(torch.nn.Module):
    """Stands in for decoder layer ``index``: records its arguments, passes the hidden states on."""

    def __init__(self, index: int, record: dict, stop: bool):
        super().__init__()
        self.index, self.record, self.stop = index, record, stop

    def forward(self, hidden_states, *args, **kwargs):
        self.record[self.index] = (hidden_states, args, kwargs)
        if self.stop:
            raise _Stop
        return hidden_states


def check_supported(model, config) -> tuple[torch.nn.Module, str]:
    """(base model, module name of its layer list); CoalaError naming what is missing."""
    what = f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})"
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module):
        raise CoalaError(f"--sequential supports {SUPPORTED}; {what} has no base model "
                         f"`model.model` (capture without --sequential)")
    missing = [a for a in ("embed_tokens", "layers", "rotary_emb") if getattr(base, a, None) is None]
    if not missing and not isinstance(base.layers, torch.nn.ModuleList):
        missing = ["layers (as a ModuleList)"]
    if missing:
        raise CoalaError(f"--sequential supports {SUPPORTED}; {what} has no "
                         f"{', '.join('model.' + m for m in missing)} (capture without --sequential)")
    prefix = next(n for n, m in model.named_modules() if m is base.layers)
    return base, prefix


class BlockModel:
    """A causal LM run as embeddings, then decoder blocks one at a time.

    Lazy (safetensors checkpoint): the model is a ``meta`` skeleton and a block's
    weights are read from disk by `load_block` and dropped by `free_block`.
    Otherwise (GGUF): the whole model is on the CPU and blocks move to ``device``
    one at a time.
    """

    def __init__(self, spec: models.ModelSpec, config, dtype: str, device: torch.device,
                 progress: bool = False, say=lambda msg: None):
        self.device, self.dtype = device, getattr(torch, dtype)
        skeleton = models.load_skeleton(config, dtype)
        base, _ = check_supported(skeleton, config)  # before loading any weight
        self.weights = models.LazyWeights.find(spec)
        if self.weights is not None:
            volatile = [f"{i}.{n}" for i, b in enumerate(base.layers)
                        for n, _ in b.named_buffers() if n not in b.state_dict()]
            if volatile:  # computed at construction, not stored: cannot be restored per block
                say(f"note: decoder blocks hold computed buffers ({volatile[0]}, ...): "
                    f"loading the model whole on the CPU")
                self.weights = None
        if self.weights is None:
            say("note: this model's weights cannot be read one block at a time (GGUF, or not "
                "safetensors): it is loaded whole on the CPU once, and one block at a time "
                "goes to the device")
            self.model = models.load_model(spec, dtype, "cpu", config=config, progress=progress)
        else:
            self.model = skeleton
        self.base, self.prefix = check_supported(self.model, config)
        self.blocks = list(self.base.layers)
        self._kwargs: dict[int, list] = {}
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        self._embedding_loaded = False
        if self.weights is not None:
            # non-persistent buffers (inv_freq): computed by the constructor, as from_pretrained does
            rotary = self.base.rotary_emb
            with torch.device("cpu"):
                try:
                    fresh = type(rotary)(config=rotary.config if hasattr(rotary, "config") else config)
                except TypeError:
                    fresh = type(rotary)(config, device="cpu")
            self.base.rotary_emb = fresh.to(device)
        else:
            self.base.rotary_emb.to(device)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_of(self, module_name: str) -> int | None:
        """Index of the block holding module ``module_name``, None if outside every block."""
        head = self.prefix + "."
        if not module_name.startswith(head):
            return None
        return int(module_name[len(head):].split(".", 1)[0])

    def block_targets(self, pattern: str | None) -> dict[int, list[tuple[str, torch.nn.Linear]]]:
        """The linear layers to capture, per block; CoalaError for any outside the blocks."""
        out: dict[int, list] = {}
        outside = []
        for name, mod in linear_targets(self.model, pattern):
            k = self.block_of(name)
            (outside.append(name) if k is None else out.setdefault(k, []).append((name, mod)))
        if outside:
            raise CoalaError(f"--sequential captures linear layers inside the decoder blocks "
                             f"({self.prefix}.N); {outside[0]} is outside them: exclude it with "
                             f"--layers or capture without --sequential")
        return out

    # -- materialising parts --------------------------------------------------
    # A block's tensors come from a pool of buffers that every block reuses (all blocks
    # have the same shapes): allocating and freeing a block's worth of tensors per block
    # made glibc's heap grow by about half a block each time (its mmap threshold adapts
    # to the freed sizes), so peak RSS grew with the number of blocks.
    def _take(self, shape, dtype) -> torch.Tensor:
        free = self._pool.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=self.device)

    def load_block(self, k: int) -> torch.nn.Module:
        block = self.blocks[k]
        if self.weights is None:
            return block.to(self.device)
        prefix = f"{self.prefix}.{k}."
        shapes = block.state_dict(keep_vars=True)
        tensors = self.weights.read([prefix + n for n in shapes])
        for name, meta in shapes.items():
            owner, _, attr = name.rpartition(".")
            mod = block.get_submodule(owner)
            buf = self._take(meta.shape, meta.dtype)
            buf.copy_(tensors.pop(prefix + name))  # casts to the model dtype, as .to(dtype) does
            if attr in mod._parameters:
                mod._parameters[attr] = torch.nn.Parameter(buf, requires_grad=False)
            else:
                mod._buffers[attr] = buf
        return block

    def free_block(self, k: int) -> None:
        block = self.blocks[k]
        if self.weights is None:
            if self.device.type != "cpu":
                block.to("cpu")
            return
        for mod in block.modules():
            for table in (mod._parameters, mod._buffers):
                for attr, t in table.items():
                    if t is None or t.device.type == "meta":
                        continue
                    self._pool.setdefault((tuple(t.shape), t.dtype), []).append(t.detach())
                    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    table[attr] = (torch.nn.Parameter(meta, requires_grad=False)
                                   if isinstance(t, torch.nn.Parameter) else meta)

    def materialised_blocks(self) -> list[int]:
        """Blocks whose parameters are on a real device (lazy mode; for tests)."""
        return [k for k, b in enumerate(self.blocks)
                if any(p.device.type != "meta" for p in b.parameters())]

    def load_embeddings(self) -> None:
        if not self._embedding_loaded:
            emb = self.base.embed_tokens
            if self.weights is not None:
                prefix = next(n for n, m in self.model.named_modules() if m is emb) + "."
                names = list(emb.state_dict())
                tensors = self.weights.read([prefix + n for n in names])
                emb.to_empty(device=self.device)
                emb.load_state_dict({n: tensors[prefix + n] for n in names}, strict=True)
            else:
                emb.to(self.device)
            self._embedding_loaded = True

    def free_embeddings(self) -> None:
        if self._embedding_loaded:
            emb = self.base.embed_tokens
            if self.weights is not None:
                emb.to_empty(device="meta")
            elif self.device.type != "cpu":
                emb.to("cpu")
            self._embedding_loaded = False

    # -- running ----------------------------------------------------------------
    def _run_base(self, stop_at: int, **inputs) -> dict:
        """The base model's forward with every layer replaced by a catcher; returns
        {layer index: (hidden_states, args, kwargs)} for layers 0..stop_at."""
        record: dict = {}
        layers = self.base.layers
        for i in range(len(layers)):
            layers[i] = _Catcher(i, record, stop=(i == stop_at))
        try:
            with torch.no_grad():
                self.base(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            for i, b in enumerate(self.blocks):
                layers[i] = b
        if stop_at not in record:
            raise CoalaError(f"--sequential supports {SUPPORTED}; the forward of "
                             f"{type(self.base).__name__} did not call all its layers once")
        return record

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block 0 for ``ids`` (batch x seq_len), as the model computes them."""
        self.load_embeddings()
        return self._run_base(0, input_ids=ids.to(self.device))[0][0]

    def layer_args(self, k: int, batch: int, seq_len: int) -> tuple[tuple, dict]:
        """(args, kwargs) the model passes to layer ``k`` besides the hidden states, for
        ``batch`` x ``seq_len`` inputs (no padding: the same for every batch of that shape)."""
        if batch not in self._kwargs:
            dummy = torch.zeros(batch, seq_len, self.model.config.hidden_size,
                                dtype=self.dtype, device=self.device)
            rec = self._run_base(len(self.blocks) - 1, inputs_embeds=dummy)
            self._kwargs[batch] = [(rec[i][1], rec[i][2]) for i in range(len(self.blocks))]
        return self._kwargs[batch][k]

    def run_block(self, k: int, x: torch.Tensor) -> torch.Tensor | None:
        """Block ``k`` on ``x`` (batch x seq_len x hidden, on the device); None if a hook stopped it."""
        args, kwargs = self.layer_args(k, x.shape[0], x.shape[1])
        try:
            out = self.blocks[k](x, *args, **kwargs)
        except _StopForward:
            return None
        return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------
# The work directory: hidden states, progress record, pending partial chunks

class WorkDir:
    """``--hidden-dir``: see the module docstring."""

    def __init__(self, path: Path, samples: int, seq_len: int, dtype: str):
        self.path, self.samples, self.seq_len, self.dtype = Path(path), samples, seq_len, dtype
        self._group = None

    @property
    def progress_path(self) -> Path:
        return self.path / "progress.json"

    def pending_path(self, name: str) -> Path:
        return self.path / "pending" / f"{name}.safetensors"

    def read_progress(self) -> dict | None:
        try:
            rec = json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("format") == WORK_FORMAT else None

    def write_progress(self, rec: dict) -> None:
        checkpoint.atomic_write(self.progress_path,
                                json.dumps({"format": WORK_FORMAT, **rec}, sort_keys=True).encode())

    def reset(self) -> None:
        """Delete what a run made here and start empty; refuse a directory that is not ours."""
        if self.path.exists():
            if not self.path.is_dir() or not self._ours():
                raise StoreError(f"{self.path} exists and is not a sequential-capture work "
                                 f"directory; choose another --hidden-dir (capture never deletes "
                                 f"what it did not write)")
            shutil.rmtree(self.path)
        (self.path / "pending").mkdir(parents=True)
        self._group = None

    def _ours(self) -> bool:
        """Holds nothing but what `WorkDir` writes (or nothing)."""
        return all(p.name in ("progress.json", "hidden.zarr", "pending")
                   or p.name.startswith(".progress.json" + checkpoint.TEMP_MARK)
                   for p in self.path.iterdir())

    def remove(self) -> None:
        if self.path.is_dir() and self._ours():
            shutil.rmtree(self.path)

    # hidden states
    def group(self):
        import zarr

        if self._group is None:
            self._group = zarr.open_group(store=zarr.storage.LocalStore(self.path / "hidden.zarr"),
                                          mode="a")
        return self._group

    def array(self, name: str, hidden: int | None = None):
        g = self.group()
        if name in g.array_keys():
            arr = g[name]
            if hidden is None or arr.shape == (self.samples, self.seq_len, hidden):
                return arr
        if hidden is None:
            return None
        from .store import _format as fmt

        return g.create_array(name, shape=(self.samples, self.seq_len, hidden),
                              dtype=fmt.stored_dtype(self.dtype),
                              chunks=(1, self.seq_len, hidden), compressors=None, fill_value=0,
                              attributes={"block": None, "samples": 0}, overwrite=True)

    def state(self, name: str) -> tuple[int | None, int]:
        """(block whose output array ``name`` holds, samples of it written)."""
        arr = self.array(name)
        if arr is None:
            return None, 0
        a = arr.attrs.asdict()
        return a.get("block"), int(a.get("samples", 0))

    def set_state(self, name: str, block: int, samples: int) -> None:
        self.array(name).update_attributes({"block": block, "samples": samples})  # one write

    def write(self, name: str, start: int, t: torch.Tensor, block: int) -> None:
        from .store import to_stored

        arr = self.array(name, t.shape[-1])
        arr[start:start + t.shape[0]] = to_stored(t)  # data first, then the count
        self.set_state(name, block, start + t.shape[0])

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        from .store import from_stored

        return from_stored(np.asarray(self.array(name)[start:stop]), self.dtype)


def default_hidden_dir(out: str) -> Path:
    p = Path(out)
    return p.with_name(p.name + ".sequential")


# ---------------------------------------------------------------------------
# The run

def run_sequential(config: CaptureConfig, plan: _Plan, state: str | None, summary: dict, say,
                   progress: bool, t0: float) -> dict:
    """`capture.run_capture` with ``config.sequential``; same summary keys plus
    ``blocks`` (blocks run) and ``block_before`` (the block a resumed run started at);
    with ``--propagate``, ``propagate``: the settings (method, ratio, rank, mu) and, for
    a run that got to the end, ``compressed_layers``, ``reduce_seconds``, ``solve_seconds``
    (this run's)."""
    work = WorkDir(Path(config.hidden_dir) if config.hidden_dir else default_hidden_dir(config.out),
                   config.samples, config.seq_len, plan.dtype)
    propagate = plan.attrs["capture_settings"].get("propagate")
    if state == "complete":
        if propagate:  # a run killed between the final commit and the final reduce
            _reduce(config, plan, None)
        work.remove()
        summary.update(status="already complete", samples_before=config.samples, raw_bytes=0,
                       seconds=time.perf_counter() - t0)
        return summary
    if state is None:
        work.reset()  # refuses a foreign directory before the store is replaced
    plan.attrs["capture_settings"]["sequential"] = True
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
        with _signals_as_interrupt():
            try:
                sizes = _run_blocks(bm, store, work, rec, targets, last, plan, config, progress, say,
                                    summary)
            except _Signalled as sig:
                raise Interrupted(f"capture interrupted by {sig.args[0]}; {store.path} keeps every "
                                  f"committed chunk: rerun the same command to resume") from None
    finally:
        store.close()
    work.remove()
    summary.update(status="complete", samples_before=0, block_before=before, blocks=last + 1,
                   inputs=len(sizes.pop("inputs")), seconds=time.perf_counter() - t0, **sizes)
    return summary


def _run_blocks(bm: BlockModel, store, work: WorkDir, rec: dict, targets: dict, last: int,
                plan: _Plan, config: CaptureConfig, progress: bool, say, summary: dict) -> dict:
    from tqdm.auto import tqdm

    samples, seq_len, B = config.samples, config.seq_len, plan.batch_size
    ids = plan.cal.ids
    raw = 0
    propagate = plan.attrs["capture_settings"].get("propagate")
    passes = 2 if propagate else 1  # per block but the last: capture (+ propagate)
    done_passes = (rec["src"] is not None) + passes * rec["next_block"] \
        + (propagate is not None and rec.get("captured") == rec["next_block"])
    bar = tqdm(total=(1 + passes * last + 1) * samples, initial=done_passes * samples,
               unit="sample", desc="capture --sequential" + (" --propagate" if propagate else ""),
               disable=None if progress else True, dynamic_ncols=True)
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
                    raw += _capture_block(bm, k, store, work, src, dst, targets.get(k, []),
                                          k != last, rec, plan, config, bar, say)
                else:
                    raw += _propagate_block(bm, k, store, work, src, dst, targets.get(k, []),
                                            k == last, rec, plan, config, bar, say, timing)
            finally:
                bm.free_block(k)
            rec.update(next_block=k + 1, src=rec["src"] if k == last else dst)
            rec.pop("captured", None)
            work.write_progress(rec)  # after dst's count: the next block may start
        bar.set_postfix_str("final commit", refresh=False)
        names, last_raw = _finish(store, work, samples, seq_len)
        raw += last_raw
        if propagate:  # every input's last, partial chunk onto its result: the store is reduced
            t = time.perf_counter()
            _reduce(config, plan, None)
            timing["reduce_seconds"] += time.perf_counter() - t
            summary["propagate"].update(timing)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    return {"inputs": names, "raw_bytes": raw,
            "store_raw_bytes": sum(store.input(n).n for n in names) * samples * seq_len
            * getattr(torch, plan.dtype).itemsize,
            "stored_bytes": sum(store.stored_bytes(n) for n in names)}


def _capture_block(bm: BlockModel, k: int, store, work: WorkDir, src: str, dst: str,
                   targets: list, write_output: bool, rec: dict, plan: _Plan, config: CaptureConfig,
                   bar, say) -> int:
    """All samples through block ``k`` (loaded), capturing the inputs of ``targets`` and,
    with ``write_output``, writing its outputs to ``dst`` (without, the forward stops after
    the last hooked linear); returns raw bytes written. Resumes after the committed chunks
    and the output rows written (by an earlier run)."""
    samples, seq_len, B = config.samples, config.seq_len, plan.batch_size
    dtype = getattr(torch, plan.dtype)
    groups: list[InputGroup] = []
    fire_order: list[str] = []
    if targets:
        x0 = work.read(src, 0, 1).to(bm.device)
        groups, fire_order, crc = probe_run(lambda: bm.run_block(k, x0), targets, seq_len, dtype)
        old = rec["probe_crc32"].get(str(k))
        if old is not None and old != crc:
            say(f"warning: block {k}'s activations on sample 0 differ from those recorded when it "
                f"was started (other weights, device or library versions?): the resumed part "
                f"will not be bit-identical to an uninterrupted run")
        if old is None:
            rec["probe_crc32"][str(k)] = crc
            work.write_progress(rec)
        for g in groups:
            store.create_input(g.name, g.n, g.consumers)  # idempotent; StoreError if it differs
    infos = {g.name: store.input(g.name) for g in groups}
    committed = {i.tokens for i in infos.values()}
    if len(committed) > 1:
        raise StoreError(f"{store.path}: the inputs of block {k} hold different committed token "
                         f"counts ({sorted(committed)}); the store is inconsistent (--overwrite "
                         f"starts over)")
    cap_start = (committed.pop() if committed else 0) // seq_len  # whole chunks: batch-aligned
    per_chunk = plan.chunk_tokens // seq_len
    if not groups:
        cap_start = samples
    out_block, out_rows = work.state(dst)
    done_out = samples if not write_output else (out_rows if out_block == k else 0)
    start = (min(cap_start, done_out) // B) * B
    bar.update(min(start, samples))
    if start >= samples:
        return 0
    if write_output and out_block != k:
        work.array(dst, bm.model.config.hidden_size)
        work.set_state(dst, k, 0)  # the array held block k-2's output: now block k's, empty

    first_chunk = cap_start * seq_len // plan.chunk_tokens
    buffers = {g.name: _ChunkBuffer(plan.chunk_tokens, g.n, dtype, first_chunk) for g in groups}
    crcs = {g.name: list(infos[g.name].chunk_crc32) for g in groups}
    writer = _Writer(store, crcs, {g.name: g.n for g in groups}, dtype.itemsize, plan.writers)
    stop_after = fire_order[-1] if (not write_output and fire_order) else None
    feeding = [False]

    def hook(name):
        def pre_hook(mod, args, kwargs):
            if feeding[0]:
                x = _linear_input(args, kwargs)
                for index, chunk in buffers[name].add(x.reshape(-1, x.shape[-1])):
                    writer.put(("chunk", name, index, chunk))
            if name == stop_after:
                raise _StopForward
        return pre_hook

    mods = dict(bm.blocks[k].named_modules())
    head = f"{bm.prefix}.{k}."
    handles = [mods[g.name[len(head):]].register_forward_pre_hook(hook(g.name), with_kwargs=True)
               for g in groups]
    done_chunks = cap_start // per_chunk
    try:
        with torch.no_grad():
            for s in range(start, samples, B):
                feeding[0] = s >= cap_start  # cap_start is a chunk, hence a batch, boundary
                out = bm.run_block(k, work.read(src, s, s + B).to(bm.device))
                if write_output:
                    work.write(dst, s, out, block=k)
                done = min(s + B, samples)
                while feeding[0] and (done_chunks + 1) * per_chunk <= done:
                    done_chunks += 1
                    writer.put(("commit", 0, done_chunks * plan.chunk_tokens, False))
                bar.update(done - s)
        writer.close()
    except BaseException:
        writer.close()  # finish queued commits; a writer error (disk full) replaces this one
        raise
    finally:
        for h in handles:
            h.remove()
    for name, b in buffers.items():  # the last, partial chunk: kept aside until the end
        p = b.flush()
        if p is not None:
            checkpoint.save_state(work.pending_path(name), {"rows": p[1]},
                                  {"index": p[0], "block": k})
    return writer.raw_bytes


# ---------------------------------------------------------------------------
# --propagate: reduce, solve and compress block by block

def _propagate_block(bm: BlockModel, k: int, store, work: WorkDir, src: str, dst: str,
                     targets: list, is_last: bool, rec: dict, plan: _Plan, config: CaptureConfig,
                     bar, say, timing: dict) -> int:
    """Block ``k`` (loaded) with --propagate: capture pass, reduce, solve, compress, propagation
    pass (module docstring); returns raw bytes written."""
    raw = 0
    if rec.get("captured") != k:
        raw = _capture_block(bm, k, store, work, src, dst, targets, False, rec, plan, config,
                             bar, say)
        rec["captured"] = k
        work.write_progress(rec)
    names = [n for n in store.inputs if bm.block_of(n) == k]
    if names:
        t = time.perf_counter()
        _reduce(config, plan, names)
        timing["reduce_seconds"] += time.perf_counter() - t
    if is_last:
        return raw  # nothing after it sees its outputs
    if names:
        t = time.perf_counter()
        with torch_threads(plan.compute_threads):
            timing["compressed_layers"] += len(compress_block(bm, k, store, work, names, plan))
        timing["solve_seconds"] += time.perf_counter() - t
    _capture_block(bm, k, store, work, src, dst, [], True, rec, plan, config, bar, say)
    return raw


def _reduce(config: CaptureConfig, plan: _Plan, names: list[str] | None) -> dict:
    """``run_reduce`` with its defaults on the capture's device: ``names`` (exactly) or every
    input; a finished result is skipped, a checkpoint resumed, a longer input extended."""
    from .reduce import ReduceConfig, run_reduce

    pattern = None if names is None else "^(?:" + "|".join(map(re.escape, names)) + ")$"
    return run_reduce(config.out, ReduceConfig(device=str(plan.device), inputs=pattern,
                                               threads=plan.compute_threads),
                      progress=False)


def reduced_input(store, work: WorkDir, name: str, device: torch.device):
    """The store's reduce result of ``name`` with its pending partial chunk (if any) folded on
    top in memory, as the final reduce will fold it; a ``ReducedInput``."""
    from .reduce import DTYPES, Partial, fold_group

    red = store.factor(name)
    info = store.input(name)
    if red is None or not red.complete or red.meta.get("next_chunk") != info.num_chunks:
        raise StoreError(f"{store.path}: input {name} has no complete reduce result after "
                         f"reducing it; rerun the same command")
    if info.tokens == work.samples * work.seq_len:
        return red
    p = work.pending_path(name)
    if not p.is_file():
        raise StoreError(f"{store.path}: input {name} holds {info.tokens} of "
                         f"{work.samples * work.seq_len} rows and its last chunk is missing from "
                         f"{p.parent}; delete {work.path} and rerun to recompute it")
    t, meta = checkpoint.load_state(p)
    if meta.get("index") != info.num_chunks:
        raise StoreError(f"{p}: pending chunk {meta.get('index')} does not follow the "
                         f"{info.num_chunks} committed chunks of {name}")
    part = Partial(red.R, red.abs_sum, red.gram, red.tokens).to(device)
    fold_group(part, [(info.num_chunks, t["rows"])], name=name, n=info.n,
               dtype=DTYPES[red.meta["settings"]["dtype"]], device=device)
    return dataclasses.replace(red, R=part.R, abs_sum=part.abs_sum, gram=part.gram,
                               tokens=part.tokens, meta={**red.meta, "pending_folded": True})


def compress_block(bm: BlockModel, k: int, store, work: WorkDir, names: list[str],
                   plan: _Plan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace the weights of block ``k``'s linears (the consumers of ``names``) by A @ B as
    ``coala-stream solve`` computes them from this store with the capture's --propagate
    settings, on the capture's device. Returns {module name: (A, B)} of the layers changed
    (layers whose rank saves no parameters stay dense, as solve keeps them)."""
    from . import solve

    settings = plan.attrs["capture_settings"]["propagate"]
    cfg = solve.SolveConfig(out="-", **settings)
    device = plan.device
    head = f"{bm.prefix}.{k}."
    mods = dict(bm.blocks[k].named_modules())
    layers = []
    for name in names:
        for consumer in store.input(name).consumers:
            mod = mods[consumer[len(head):]]
            layers.append(solve.Layer(consumer, name, mod.out_features, mod.in_features))
    dtypes: dict[str, torch.dtype] = {}

    def weight(consumer: str) -> torch.Tensor:
        if bm.weights is not None:  # as stored, as solve reads it
            W = bm.weights.read([consumer + ".weight"])[consumer + ".weight"]
        else:  # loaded whole (GGUF): the weights as the model holds them
            W = mods[consumer[len(head):]].weight.detach()
        dtypes[consumer] = W.dtype
        return W

    from .devices import resolve_device

    reduce_device = resolve_device(str(device))
    factors = solve.factor_layers(layers, weight, lambda n: reduced_input(store, work, n, reduce_device),
                                  cfg, device)
    with torch.no_grad():
        for consumer, res in factors.items():
            mod = mods[consumer[len(head):]]
            mod.weight.copy_((res["A"] @ res["B"]).to(dtypes[consumer]))  # solve --format dense
    return {c: (res["A"], res["B"]) for c, res in factors.items()}


def _finish(store, work: WorkDir, samples: int, seq_len: int) -> tuple[list[str], int]:
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
