"""coala-stream: Gram-free context-aware low-rank approximation (COALA) at scale.

Everything is imported on first use (PEP 562), so ``import coala_stream`` costs
nothing, the CLI can configure the process (threads) before torch is imported,
and the math (``fold_r``, ``merge_r``, ``coala_factors``, the baselines) does not
pull in transformers, zarr or dask.
"""

from importlib import import_module

from ._version import __version__
from .errors import CheckpointMismatch, CoalaError, DataError, Interrupted, LockedError, StoreError, UsageError

# public name -> module that defines it
_LAZY = {
    "fold_r": "linalg",
    "merge_r": "linalg",
    "coala_factors": "linalg",
    "coala_svd": "linalg",
    "regularize_r": "linalg",
    "tail_energy": "linalg",
    "rank_for_ratio": "linalg",
    "output_factors": "objective",
    "svd_factors": "baselines",
    "svdllm_factors": "baselines",
    "asvd_factors": "baselines",
    "aasvd_factors": "baselines",
    "open_store": "store",
    "create_store": "store",
    "CaptureConfig": "capture",
    "run_capture": "capture",
    "SequentialConfig": "sequential",
    "run_sequential": "sequential",
    "ReduceConfig": "reduce",
    "run_reduce": "reduce",
    "SolveConfig": "solve",
    "run_solve": "solve",
    "CompressConfig": "compress",
    "run_compress": "compress",
    "MergeConfig": "merge",
    "merge_shards": "merge",
    "load_output": "export",
    "load_model": "export",
    "EvalConfig": "evaluate",
    "perplexity": "evaluate",
    "TasksConfig": "tasks",
    "evaluate_tasks": "tasks",
    "store_status": "status",
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
