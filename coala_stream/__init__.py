"""coala-stream: Gram-free context-aware low-rank approximation (COALA) at scale."""

from ._version import __version__
from .errors import CoalaError, CheckpointMismatch, DataError, Interrupted, LockedError, StoreError, UsageError

__all__ = [
    "__version__",
    "CoalaError",
    "CheckpointMismatch",
    "DataError",
    "Interrupted",
    "LockedError",
    "StoreError",
    "UsageError",
]
