"""Ranks from loss-aware component scores, model-wide, under a parameter budget.

Pure: lists of tensors and ints in, ranks out. Each layer's components are dropped from
its tail (smallest singular value first), so a layer keeps a prefix and COALA's
factors of that rank are exactly the kept components. The candidate of a layer is
its next tail component; one rule picks among the layers' candidates:

- ``zerosum`` (ZS-SVD, Lin et al.): keep the running sum of the predicted loss
  changes near zero: while it is <= 0 take the positive candidate of smallest size,
  else the negative one of smallest size (either sign when one side is empty);
- ``smallest``: the candidate whose predicted change is smallest (most negative first).

Parameters: a layer of rank r costs r (m + n) while that is below m n, else it stays
dense (m n). Components are dropped until the total is at most the budget; a drop
that crosses a layer's break-even saves a lump, so the total can fall below the
budget: then dropped components are given back, the one of the largest predicted
change first, while one fits. The total never exceeds the budget; what is left
unspent is smaller than the cost of any component that could still be given back.
"""

from __future__ import annotations

import heapq

import torch

from ..errors import UsageError

RULES = ("zerosum", "smallest")


def layer_cost(rank: int, m: int, n: int) -> int:
    """Parameters of a layer kept at ``rank``: factors when they save, else the dense matrix."""
    return rank * (m + n) if rank * (m + n) < m * n else m * n


def select_ranks(deltas: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int,
                 rule: str = "zerosum") -> tuple[list[int], dict]:
    """Ranks (>= 1 each) with sum of `layer_cost` <= ``budget``; and a summary.

    ``deltas[i]`` (k_i,): the predicted loss change of dropping each component of layer
    i, in the order of its singular values (descending). A returned rank r with
    r (m + n) >= m n means: keep the layer dense. The summary: spent, budget, the
    running sum of the predicted changes of what is dropped from compressed layers.
    """
    if rule not in RULES:
        raise UsageError(f"--selection must be one of {', '.join(RULES)}, got {rule!r}")
    d = [x.detach().to(torch.float64).cpu().tolist() for x in deltas]
    ranks = [len(x) for x in d]
    spent = sum(layer_cost(r, m, n) for r, (m, n) in zip(ranks, shapes))
    floor = sum(layer_cost(1, m, n) for m, n in shapes)
    if floor > budget:
        raise UsageError(f"a parameter budget of {budget} cannot give every layer rank 1 "
                         f"({floor} parameters)")
    spent = _drop(d, shapes, ranks, spent, budget, rule)
    spent = _give_back(d, shapes, ranks, spent, budget)
    predicted = sum(sum(x[r:]) for x, r, (m, n) in zip(d, ranks, shapes)
                    if r * (m + n) < m * n)
    return ranks, {"budget": budget, "spent": spent, "predicted_loss_change": predicted}


def _drop(d, shapes, ranks, spent, budget, rule) -> int:
    """Drop tail components by ``rule`` until ``spent <= budget``; returns spent."""
    pos: list = []
    neg: list = []

    def push(i: int) -> None:
        if ranks[i] > 1:
            v = d[i][ranks[i] - 1]
            if rule == "smallest":
                heapq.heappush(neg, (v, i))
            else:
                heapq.heappush(pos if v > 0 else neg, (abs(v), i))

    for i in range(len(d)):
        push(i)
    running = 0.0
    while spent > budget:
        side = (pos if running <= 0 else neg) if rule == "zerosum" else neg
        heap = side if side else (neg if side is pos else pos)
        _, i = heapq.heappop(heap)  # never empty: rank 1 everywhere fits the budget
        m, n = shapes[i]
        running += d[i][ranks[i] - 1]
        spent -= layer_cost(ranks[i], m, n) - layer_cost(ranks[i] - 1, m, n)
        ranks[i] -= 1
        push(i)
    return spent


def _give_back(d, shapes, ranks, spent, budget) -> int:
    """Re-add dropped components (largest predicted change first) while one fits."""
    heap = [(-d[i][ranks[i]], i) for i in range(len(d)) if ranks[i] < len(d[i])]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        m, n = shapes[i]
        extra = layer_cost(ranks[i] + 1, m, n) - layer_cost(ranks[i], m, n)
        if spent + extra > budget:
            continue  # this layer's next one does not fit; others may
        ranks[i] += 1
        spent += extra
        if ranks[i] < len(d[i]):
            heapq.heappush(heap, (-d[i][ranks[i]], i))
    return spent
