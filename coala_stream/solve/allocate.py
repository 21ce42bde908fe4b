"""Ranks: the same ratio per layer, or one parameter budget spent where the exact errors say.

`sum_{i>r} S_i^2` (the tail of W R^T's spectrum) is the exact weighted error of
each rank choice, so a global allocation needs only the spectra.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

import torch

from ..errors import UsageError
from ..linalg import rank_for_ratio, tail_energy
from .layer import Layer, layer_spectrum, normalised_tail

if TYPE_CHECKING:
    from .config import SolveConfig


def total_normalised_error(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    return sum(normalised_tail(S, r) for S, r in zip(spectra, ranks))


def allocate_global(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int,
                    caps: list[int]) -> list[int]:
    """Ranks r_i (1 <= r_i <= caps[i]) with sum r_i (m_i + n_i) <= budget, greedy.

    Every layer starts at rank 1; each step raises the rank of the layer whose
    next singular value lowers its normalised error ``S_r^2 / sum S^2`` the most
    per parameter spent (m + n). The tails are convex in r (singular values
    descend), so this is the optimal fractional allocation; it is an integer
    knapsack, so the result may leave fewer than (m + n) parameters of the
    cheapest still-growing layer unspent, and is not guaranteed to beat uniform:
    the caller compares and keeps the better. Cost O(total steps x log layers).
    """
    costs = [m + n for m, n in shapes]
    ranks = [1] * len(spectra)
    spent = sum(costs)
    if spent > budget:
        raise UsageError(f"a parameter budget of {budget} cannot give every layer rank 1 "
                         f"({spent} parameters)")
    totals = [float(tail_energy(S)[0]) for S in spectra]

    def key(i: int) -> tuple[float, int]:
        S, r = spectra[i], ranks[i]
        gain = float(S[r]) ** 2 / totals[i] if r < len(S) and totals[i] > 0 else 0.0
        return (-gain / costs[i], i)

    heap = [key(i) for i in range(len(spectra)) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue  # never fits again: the remaining budget only shrinks
        ranks[i] += 1
        spent += costs[i]
        if ranks[i] < caps[i]:
            heapq.heappush(heap, key(i))
    return ranks


def round_ranks(layers: list[Layer], multiple: int) -> None:
    """Round each ``layer.rank`` down to a multiple of ``multiple`` (a rank below it stays,
    and so does a layer kept dense: rounding must not turn it into a factorized one).
    Rounding down never spends more parameters than the allocation did; what it frees is
    left unspent (`--rank-multiple`)."""
    if multiple > 1:
        for layer in layers:
            if layer.rank >= multiple and layer.saves_parameters():
                layer.rank -= layer.rank % multiple


def uniform_ranks(layers: list[Layer], config: SolveConfig) -> list[int]:
    ranks = []
    for layer in layers:
        if config.rank is not None:
            if config.rank > min(layer.m, layer.n):
                raise UsageError(f"--rank {config.rank} exceeds min(m, n) = {min(layer.m, layer.n)} "
                                 f"of {layer.name} ({layer.m} x {layer.n})")
            ranks.append(config.rank)
        else:
            ranks.append(rank_for_ratio(layer.m, layer.n, config.ratio))
    return ranks


def choose_ranks(layers, uniform, config, source, reader, progress) -> dict:
    """Set ``layer.rank`` (uniform or global); returns the allocation summary for the report."""
    for layer, r in zip(layers, uniform):
        layer.rank = r
    if config.allocate == "uniform":
        return {"allocate": "uniform"}
    from ..progress import track

    for layer in track(layers, "solve: spectra", "layer", enabled=progress):
        W = source.get(f"{layer.name}.weight").to(reader.device)
        layer.spectrum = layer_spectrum(W, reader.get(layer.input), config,
                                        reader.narrow(layer)).cpu()
    spectra = [layer.spectrum for layer in layers]
    peft = config.format == "peft"
    # keeping a layer dense is what uniform does when its rank saves nothing; count it so
    uniform_cost = [r * l.cost if peft or l.saves_parameters(r) else l.m * l.n
                    for l, r in zip(layers, uniform)]
    budget = sum(uniform_cost)
    caps = [min(l.m, l.n) if peft else max(1, math.ceil(l.m * l.n / l.cost) - 1) for l in layers]
    greedy = allocate_global(spectra, [(l.m, l.n) for l in layers], budget, caps)
    uniform_eff = [r if peft or l.saves_parameters(r) else min(l.m, l.n) for l, r in zip(layers, uniform)]
    err_u = total_normalised_error(spectra, uniform_eff)
    err_g = total_normalised_error(spectra, greedy)
    chosen = "global" if err_g < err_u else "uniform"
    if chosen == "global":
        for layer, r in zip(layers, greedy):
            layer.rank = r
    return {"allocate": chosen, "requested": "global", "budget": budget,
            "spent": sum(r * l.cost for l, r in zip(layers, greedy)) if chosen == "global" else budget,
            "total_normalised_error": min(err_g, err_u), "uniform_total_normalised_error": err_u,
            "global_total_normalised_error": err_g}
