"""coala-stream: Gram-free context-aware low-rank approximation (COALA) at scale.

The math core (``fold_r``, ``merge_r``, ``coala_factors``, baselines) is
imported eagerly and needs only torch. The pipeline (store, capture, reduce,
solve, export, eval) is imported on first use, so ``import coala_stream``
does not pull in transformers, zarr or dask.
"""

from importlib import import_module

from ._version import __version__
from .baselines import asvd_factors, svd_factors, svdllm_factors
from .errors import CoalaError, CheckpointMismatch, DataError, Interrupted, LockedError, StoreError, UsageError
from .linalg import coala_factors, coala_svd, fold_r, merge_r, rank_for_ratio, regularize_r, tail_energy

# public name -> module that defines it
_LAZY = {
    "open_store": "store",
    "create_store": "store",
    "CaptureConfig": "capture",
    "run_capture": "capture",
    "ReduceConfig": "reduce",
    "run_reduce": "reduce",
    "SolveConfig": "solve",
    "run_solve": "solve",
    "load_model": "export",
    "EvalConfig": "evaluate",
    "perplexity": "evaluate",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'coala_stream' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
    *_LAZY,
]
