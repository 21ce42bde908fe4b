"""Solve: low-rank factors for every linear layer from a reduced store, written as a model.

- `config`: `SolveConfig`, the method, allocation and format names;
- `layer`: one layer's factors by method, the exact error, cond(R) (pure);
- `allocate`: uniform ranks, or one parameter budget spent by the exact errors;
- `report`: the per-layer report and the table;
- `run`: `run_solve`, the driver (store and weights in, `export` writers out).
"""

from .allocate import allocate_global, choose_ranks, total_normalised_error, uniform_ranks
from .config import ALLOCATIONS, FORMATS, METHODS, SolveConfig
from .layer import FACTORIZERS, Layer, cond_estimate, normalised_tail, relative_error, solve_layer
from .report import build_report, format_table
from .run import check_capture_complete, check_reduced, factor_layers, plan_layers, run_solve

__all__ = ["allocate_global", "choose_ranks", "total_normalised_error", "uniform_ranks",
           "ALLOCATIONS", "FORMATS", "METHODS", "SolveConfig", "FACTORIZERS", "Layer",
           "cond_estimate", "normalised_tail", "relative_error", "solve_layer", "build_report",
           "format_table", "check_capture_complete", "check_reduced", "factor_layers",
           "plan_layers", "run_solve"]
