"""Where computation runs: one parser for every subcommand's ``--device``."""

from __future__ import annotations

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
