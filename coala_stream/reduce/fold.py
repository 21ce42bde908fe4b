"""The fold state and its kernel: pure functions of tensors, shared by every driver.

`Partial` is R (and the statistics beside it) of a contiguous range of rows;
`fold_group` folds one group of chunks into it with ``linalg.fold_block``
(sequential TSQR: Demmel, Grigori, Hoemmen & Langou, 2012); `merge_partials`
merges two ranges (``linalg.merge_r``). No files, no stores: the local driver,
the Dask tasks and the sequential capture call these with tensors they read.

Resume determinism: chunks are folded in *groups*, fixed ranges of chunk
indices ``[j g, (j + 1) g)`` with ``g = ceil(group_rows / chunk_tokens)``
(`group_chunks`, `plan_groups`), so a resumed run repeats exactly the QRs of
an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DataError, UsageError
from ..linalg import NOT_FINITE, fold_block, merge_r, prepare_block


@dataclass
class Partial:
    """R and statistics of a contiguous range of rows. R is None before the first fold."""

    R: torch.Tensor | None
    abs_sum: torch.Tensor  # (n,) float64
    gram: torch.Tensor | None  # (n x n) float32, only with_gram
    tokens: int = 0

    @classmethod
    def empty(cls, n: int, device, with_gram: bool) -> Partial:
        gram = torch.zeros(n, n, dtype=torch.float32, device=device) if with_gram else None
        return cls(None, torch.zeros(n, dtype=torch.float64, device=device), gram)

    def copy(self) -> Partial:
        """A copy that later folds into this one leave unchanged (they update in place)."""
        clone = (lambda t: None if t is None else t.clone())
        return Partial(clone(self.R), clone(self.abs_sum), clone(self.gram), self.tokens)

    def to(self, device) -> Partial:
        move = (lambda t: None if t is None else t.to(device))
        return Partial(move(self.R), move(self.abs_sum), move(self.gram), self.tokens)


def fold_group(part: Partial, chunks: list[tuple[int, torch.Tensor]], *, name: str,
               n: int, dtype: torch.dtype, device: torch.device) -> None:
    """Fold one group of chunks (index, stored tensor) into ``part`` in place.

    The chunks are validated and upcast on the device (``prepare_block``),
    stacked and folded in one QR of [R; X] (about 2 (k + t) n^2 flops for
    t new rows). NaN/Inf raises DataError naming the input and the chunk.
    """
    blocks = []
    for index, chunk in chunks:
        chunk = chunk.to(device, non_blocking=True)  # still 16-bit: upcast happens on the device
        try:
            blocks.append(prepare_block(chunk, f"input {name!r} chunk {index}", n, dtype, device,
                                        check_finite=False))
        except UsageError as exc:
            raise DataError(f"input {name!r} chunk {index}: {_reason(exc)}") from exc
    X = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    if X.shape[0] == 0:
        return
    # The column sums ASVD needs are also the NaN/Inf test: in float64 a sum of finite
    # float32 magnitudes cannot overflow, so it is finite exactly when X is. One pass
    # instead of isfinite(X) plus a float64-accumulating reduction (3.6 -> 0.5 ms per
    # 2048 x 576 chunk on one CPU thread: 20 % of reduce's time).
    # Chunk by chunk (the float64 copy is one chunk's); part changes only once all passed.
    col_sums = torch.zeros_like(part.abs_sum)
    for (index, _), block in zip(chunks, blocks):
        sums = block.abs().double().sum(0)
        if not bool(torch.isfinite(sums).all()):
            raise DataError(f"input {name!r} chunk {index}: {NOT_FINITE}")
        col_sums += sums
    part.abs_sum += col_sums
    if part.gram is not None:
        Xg = X.float()
        part.gram.addmm_(Xg.T, Xg)
    part.R = fold_block(part.R, X)
    part.tokens += X.shape[0]


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Partial of the rows of a then b (TSQR merge of the R's, sums of the statistics)."""
    if a.R is None:
        return b
    if b.R is None:
        return a
    gram = None if a.gram is None else a.gram + b.gram.to(a.gram.device)
    return Partial(merge_r(a.R, b.R), a.abs_sum + b.abs_sum.to(a.abs_sum.device), gram,
                   a.tokens + b.tokens)


def group_chunks(n: int, chunk_tokens: int, group_rows: int | None) -> int:
    """Chunks per fold group: the fewest whole chunks holding ``group_rows`` (default 2 n) rows."""
    rows = 2 * n if group_rows is None else group_rows
    return max(1, math.ceil(rows / max(1, chunk_tokens)))


def plan_groups(start: int, stop: int, g: int) -> list[tuple[int, int]]:
    """Chunk ranges folded together: boundaries at multiples of g (plus start and stop).

    Fixed by chunk index alone, so a resumed run repeats the uninterrupted
    run's QRs exactly.
    """
    edges = [start] + list(range((start // g + 1) * g, stop, g)) + [stop]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _reason(exc: Exception) -> str:
    """The part of a prepare_block message after its 'name: ' prefix."""
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text
