"""`--allocate loss`: uniform's parameter budget spent by the predicted change of the loss.

`gradients.component_scores` gives every component's projected gradient per window;
`scores.loss_estimates` turns them into a predicted loss change per dropped component
(first order, or with --loss-terms fisher plus the per-token empirical-Fisher term);
`select.select_ranks` picks the ranks (ZS-SVD's zero-sum rule or smallest-first) within
the budget uniform spends at the same --ratio / --rank, a layer whose rank would not save
parameters staying dense. With --selection zerosum and --loss-terms first this is
ZS-SVD's one-shot selection (its components computed as COALA's, without the Gram
matrix); its optional projected-gradient correction step is not done here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..scores import loss_estimates
from .layer import Layer
from .select import layer_cost, select_ranks


def scores_dir_for(config, out: Path | str) -> Path:
    """--scores, else ``OUT.scores`` beside the output (kept: later solves reuse it)."""
    return Path(config.scores) if config.scores else Path(f"{Path(out).absolute()}.scores")


def loss_allocation(store, spec, model_config, layers: list[Layer], uniform: list[int], config,
                    device, scores_dir: Path, progress: bool, say) -> dict:
    """Set ``layer.rank`` (and ``layer.spectrum``) for every layer; returns the allocation
    section of the report: budget, spent, the predicted loss change of the chosen drops and
    of uniform's, and per layer its rank and each component's scores."""
    from .gradients import component_scores

    scores = component_scores(store, spec, model_config, layers, device, scores_dir,
                              config.calib_data, progress, say)
    terms = config.loss_terms or "first"
    rows, deltas = [], []
    for layer in layers:
        S, P, Q = scores[layer.name]
        first, _, second = loss_estimates(P, Q)  # the per-window Fisher term: see scores.py
        delta = first + second if terms == "fisher" else first
        # fewer calibration tokens than min(m, n): W R^T has fewer components than a rank
        # can hold; the rest change nothing the calibration sees, so they score 0
        deltas.append(torch.nn.functional.pad(delta, (0, min(layer.m, layer.n) - len(delta))))
        layer.spectrum = S
        rows.append((first, second, S))
    shapes = [(l.m, l.n) for l in layers]
    budget = sum(layer_cost(r, m, n) for r, (m, n) in zip(uniform, shapes))
    ranks, summary = select_ranks(deltas, shapes, budget, config.selection or "zerosum")
    for layer, r in zip(layers, ranks):
        layer.rank = r
    return {"allocate": "loss", "selection": config.selection or "zerosum", "loss_terms": terms,
            **summary, "uniform_predicted_loss_change": _predicted(deltas, uniform, shapes),
            "windows": int(scores[layers[0].name][1].shape[0]),
            "scores_file": str(Path(scores_dir).absolute()),
            "layers": [_layer_entry(l, u, d, row) for l, u, d, row in zip(layers, uniform, deltas, rows)]}


def _predicted(deltas: list[torch.Tensor], ranks: list[int], shapes) -> float:
    """Summed predicted change of the components ``ranks`` drop from compressed layers."""
    return float(sum(float(d[r:].sum()) for d, r, (m, n) in zip(deltas, ranks, shapes)
                     if r * (m + n) < m * n))


def _layer_entry(layer: Layer, uniform: int, delta: torch.Tensor, row) -> dict:
    first, second, S = row
    dense = not layer.saves_parameters()
    return {"module": layer.name, "rank": layer.rank, "uniform_rank": uniform, "kept_dense": dense,
            "predicted_loss_change": 0.0 if dense else float(delta[layer.rank:].sum()),
            "first_order": [float(x) for x in first], "second_order": [float(x) for x in second],
            "singular_values": [float(x) for x in S]}
