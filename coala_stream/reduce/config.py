"""`ReduceConfig`: the settings of one reduce run (the CLI's options are generated from it)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..devices import THREADS_RULE, resolve_device
from ..errors import UsageError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Test-only hook: seconds the local loop and the Dask tasks sleep after every group, so
# tests can kill a run (or a worker) at chosen moments of a small store. Not for users.
TEST_DELAY_ENV = "COALA_STREAM_TEST_GROUP_DELAY"


@dataclass
class ReduceConfig:
    """Settings of one reduce run; each field's ``help`` is also its CLI help."""

    device: str = field(default="auto", metadata={
        "help": "where to fold: 'auto' (cuda when available, else cpu), 'cuda', 'cuda:N' or 'cpu'",
        "metavar": "auto|cuda|cpu"})
    dtype: str = field(default="float32", metadata={
        "help": "working precision of R: float32 or float64 (16-bit chunks are upcast on the device)",
        "choices": tuple(DTYPES)})
    checkpoint_every: float = field(default=60.0, metadata={
        "help": "seconds between checkpoints (0: after every group); one is always written at the end",
        "metavar": "SECONDS"})
    inputs: str | None = field(default=None, metadata={
        "help": "only inputs whose name matches this regular expression (re.search)",
        "metavar": "REGEX"})
    group_rows: int | None = field(default=None, metadata={
        "help": "fold at least this many rows per QR, as whole chunks (default 2 n); "
                "part of the checkpoint's identity", "metavar": "N"})
    with_gram: bool = field(default=False, metadata={
        "help": "also accumulate the float32 Gram matrix X^T X as peers do (only for the "
                "SVD-LLM baseline comparison; R never needs it)"})
    workers: int | None = field(default=None, metadata={
        "help": "fold on a local Dask cluster of this many worker processes, one torch thread "
                "each (so more workers than --threads' default would give only compete for "
                "the same cores)", "metavar": "N"})
    scheduler: str | None = field(default=None, metadata={
        "help": "fold on an existing Dask cluster (scheduler address, e.g. tcp://host:8786)",
        "metavar": "ADDRESS"})
    prefetch: int = field(default=4, metadata={
        "help": "chunks read ahead in the background (bounds the memory used for reading)",
        "metavar": "K"})
    read_threads: int = field(default=2, metadata={
        "help": "background threads reading and decompressing chunks", "metavar": "N"})
    threads: int | None = field(default=None, metadata={
        "help": f"torch CPU threads; {THREADS_RULE}", "metavar": "N"})
    restart: bool = field(default=False, metadata={
        "help": "discard existing checkpoints and results of the selected inputs first"})

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (isinstance(self.checkpoint_every, (int, float)) and self.checkpoint_every >= 0):
            raise UsageError(f"--checkpoint-every: expected seconds >= 0, got {self.checkpoint_every!r}")
        for name in ("group_rows", "workers", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {value!r}")
        for name in ("prefetch", "read_threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.workers is not None and self.scheduler is not None:
            raise UsageError("--workers and --scheduler: give one of them (a local cluster or an "
                             "address), not both")
        if self.inputs is not None:
            try:
                re.compile(self.inputs)
            except re.error as exc:
                raise UsageError(f"--inputs: not a valid regular expression {self.inputs!r} ({exc})") from exc
        if not self.distributed:  # Dask workers resolve the device themselves
            resolve_device(self.device)

    @property
    def distributed(self) -> bool:
        return self.workers is not None or self.scheduler is not None

    def settings(self, n: int, chunk_tokens: int) -> dict:
        """What a result records about how it was folded (`result.RESULT_SETTINGS` must match)."""
        from .fold import group_chunks

        return {"dtype": self.dtype, "with_gram": self.with_gram,
                "group_chunks": group_chunks(n, chunk_tokens, self.group_rows),
                "group_rows": self.group_rows, "chunk_tokens": chunk_tokens}
