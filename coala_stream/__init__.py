"""coala-stream: Gram-free context-aware low-rank approximation (COALA) at scale."""

from ._version import __version__
from .baselines import asvd_factors, svd_factors, svdllm_factors
from .errors import CoalaError, CheckpointMismatch, DataError, Interrupted, LockedError, StoreError, UsageError

from .linalg import coala_factors, coala_svd, fold_r, merge_r, rank_for_ratio, regularize_r, tail_energy

__all__ = [
    "fold_r",
    "merge_r",
    "coala_factors",
    "coala_svd",
    "regularize_r",
    "tail_energy",
    "rank_for_ratio",
    "svd_factors",
    "svdllm_factors",
    "asvd_factors",
    "__version__",
    "CoalaError",
    "CheckpointMismatch",
    "DataError",
    "Interrupted",
    "LockedError",
    "StoreError",
    "UsageError",
]
