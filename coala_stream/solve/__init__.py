"""Solve: low-rank factors for every linear layer from a reduced store, written as a model.

- `config`: `SolveConfig`, the method, allocation and format names;
- `layer`: one layer's factors by method, the exact error, cond(R) (pure);
- `allocate`: uniform ranks, or one parameter budget spent by the exact errors;
- `report`: the per-layer report and the table;
- `run`: `run_solve`, the driver (store and weights in, `export` writers out).
"""

from .allocate import (allocate_global, choose_ranks, round_ranks, total_normalised_error,
                       uniform_ranks)
from .config import ALLOCATIONS, DEFAULT_ALPHA, FORMATS, METHODS, OBJECTIVES, SolveConfig
from .layer import (FACTORIZERS, OUTPUT_FACTORIZERS, Layer, cond_estimate, input_view,
                    layer_spectrum, normalised_tail, relative_error, solve_layer)
from .report import build_report, format_table
from .run import (allocate_ranks, check_capture_complete, check_reduced, factor_layers, plan_layers,
                  resolve_objective, run_solve, view_for)

__all__ = ["allocate_global", "choose_ranks", "round_ranks", "total_normalised_error", "uniform_ranks",
           "ALLOCATIONS", "DEFAULT_ALPHA", "FORMATS", "METHODS", "OBJECTIVES", "SolveConfig", "FACTORIZERS", "OUTPUT_FACTORIZERS", "Layer", "input_view", "layer_spectrum",
           "cond_estimate", "normalised_tail", "relative_error", "solve_layer", "build_report",
           "format_table", "allocate_ranks", "check_capture_complete", "check_reduced", "factor_layers",
           "plan_layers", "resolve_objective", "run_solve", "view_for"]
