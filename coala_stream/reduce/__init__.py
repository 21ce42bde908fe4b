"""Reduce: fold each stored input into the triangular factor R of a QR of its rows.

- `fold`: the fold state and kernel (pure: tensors in, tensors out);
- `prefetch`: chunks read in the background;
- `result`: the result/checkpoint file format and the one judgement of its state;
- `local`: the driver (`run_reduce`), checkpointed and resumable;
- `dask_driver`: the same over Dask distributed.
"""

from .config import DTYPES, TEST_DELAY_ENV, ReduceConfig
from .fold import Partial, fold_group, group_chunks, merge_partials, plan_groups
from .local import run_reduce, select_inputs
from .prefetch import ChunkPrefetcher
from .result import (MERGED_FROM, ReducedInput, ResultState, merged_from, read_result,
                     result_path, result_state, write_result)

__all__ = ["DTYPES", "TEST_DELAY_ENV", "ReduceConfig", "Partial", "fold_group", "group_chunks",
           "merge_partials", "plan_groups", "run_reduce", "select_inputs", "ChunkPrefetcher",
           "ReducedInput", "ResultState", "read_result", "result_path", "result_state",
           "MERGED_FROM", "merged_from", "write_result"]
