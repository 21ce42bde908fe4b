"""Where computation runs: one parser for every subcommand's ``--device``, and torch's CPU threads."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .errors import UsageError


def resolve_device(spec: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device; UsageError naming the fix otherwise.

    auto is cuda when torch sees a CUDA device, else cpu.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: torch sees no CUDA device (use --device cpu, or install "
                         f"a CUDA build of torch)")
    return device


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` torch CPU threads (None: leave them), then restore them."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_beside_writer(threads: int | None, device: torch.device, writers: int = 1) -> int | None:
    """Torch threads for a CPU forward pass that ``writers`` compressing threads run beside.

    Explicit ``threads`` win. On CPU the default leaves a core to each writer: torch's
    OpenMP threads wait for each other at every operation, so one of them descheduled
    by a writer stalls them all (SmolLM2 capture on 2 cores: 35.5 s with 2 threads,
    29.6 s with 1, as fast as the plain forward on 1). On CUDA the CPU is left alone.
    """
    if threads is not None or device.type != "cpu":
        return threads
    return max(1, torch.get_num_threads() - writers)
