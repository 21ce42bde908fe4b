"""The COALA math: streaming R, and the optimal low-rank factors from R.

Pure functions on tensors (no files, no global state). Reference: Parkina et
al., "COALA: Numerically Stable and Efficient Framework for Context-Aware
Low-Rank Approximation" (arXiv 2507.07580); TSQR: Demmel, Grigori, Hoemmen &
Langou, "Communication-optimal parallel and sequential QR" (2012).

Conventions: W is (m x n) = (out x in) as in ``torch.nn.Linear``; calibration
inputs are rows X (N x n); R is the upper-trapezoidal factor of a QR of X,
(min(N, n) x n), with canonical sign diag(R) >= 0, so R^T R = X^T X. The Gram
matrix X^T X is never formed: that would square cond(X).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .errors import UsageError

WORK_DTYPES = (torch.float32, torch.float64)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fold_r(
    blocks: Iterable[torch.Tensor],
    R: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fold row blocks of X into the triangular factor R (sequential TSQR).

    ``R <- qr([R; X_i]).R`` for each block. Short blocks are grouped so every
    QR sees at least n new rows (a QR of the stack costs about 2 (t + n) n^2
    flops for t new rows, so t << n wastes most of it on re-factoring R; the
    CPU panel path of ``fold_block`` costs 2 t n^2 plus a per-fold overhead).

    Args:
        blocks: 2-D tensors (t_i x n) of any float dtype; upcast to ``dtype``
            on ``device`` (16-bit inputs upcast exactly).
        R: a previous factor (k x n) to continue from, or None.
        dtype: working precision, float32 or float64.
        device: where to compute; default: R's device, else the first block's.

    Returns:
        R (min(N, n) x n, upper-trapezoidal, diag >= 0) with
        R^T R = R0^T R0 + sum X_i^T X_i to working precision.

    Raises:
        UsageError (a ValueError) naming the argument for a wrong shape or
        dtype, or a block holding NaN/Inf (with its index).
    """
    _check_work_dtype(dtype)
    if R is not None:
        check_triangular("R", R)
        device = R.device if device is None else device
        R = R.to(device=device, dtype=dtype)
    pending: list[torch.Tensor] = []
    pending_rows = 0
    n = None if R is None else R.shape[1]
    for index, block in enumerate(blocks):
        X = prepare_block(block, f"blocks[{index}]", n, dtype, device)
        device, n = X.device, X.shape[1]
        if X.shape[0] == 0:
            continue
        pending.append(X)
        pending_rows += X.shape[0]
        if pending_rows >= X.shape[1]:
            R = fold_block(R, _cat(pending))
            pending, pending_rows = [], 0
    if pending:
        R = fold_block(R, _cat(pending))
    if R is None:
        if n is None:
            raise UsageError("blocks: no block to fold (the iterable was empty and R is None)")
        R = torch.zeros(0, n, dtype=dtype, device=device)  # only zero-row blocks: X^T X = 0
    return R


def fold_block(R: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """One TSQR step: the canonical R of [R; X]. No checks: callers validate.

    R and X share dtype (float32/float64) and device. On CPU, once [R; X] has
    at least n rows and n >= ``_PANELED_MIN_COLUMNS``, R's triangle is not
    re-factored (``_fold_under_r``): about 2 t n^2 flops for X (t x n), the
    flops of the Gram update X^T X. Otherwise (CUDA: not measured, and one
    cuSOLVER geqrf beats the panel loop's many small kernel launches; small n;
    fewer rows than columns) one Householder QR of the stack, about
    2 (k + t) n^2 flops for R (k x n).
    """
    n = X.shape[1]
    k = 0 if R is None else R.shape[0]
    if X.device.type == "cpu" and n >= _PANELED_MIN_COLUMNS and k + X.shape[0] >= n:
        # Long blocks go in row pieces of at least max(_FOLD_ROWS, n) rows: the
        # flops are the same (2 t n^2 however X is split), but the panel loop
        # sweeps X once per panel, so a piece should stay in cache.
        for piece in X.tensor_split(max(1, X.shape[0] // max(_FOLD_ROWS, n))):
            R = _fold_under_r(R, piece)
        return _canonical(R)
    stacked = X if R is None else torch.cat([R, X])
    return _canonical(torch.linalg.qr(stacked, mode="r").R)


def merge_r(R1: torch.Tensor, R2: torch.Tensor) -> torch.Tensor:
    """The TSQR merge of two partial factors: R of [X1; X2] from R1 and R2.

    Computed in the wider of the two dtypes (at least float32), on R1's device.
    Associative and commutative up to rounding, so partial factors from
    workers may merge in any tree.
    """
    check_triangular("R1", R1)
    check_triangular("R2", R2)
    if R1.shape[1] != R2.shape[1]:
        raise UsageError(
            f"R2: expected {R1.shape[1]} columns to match R1, got {R2.shape[1]}"
        )
    dtype = torch.promote_types(torch.promote_types(R1.dtype, R2.dtype), torch.float32)
    return fold_block(R1.to(dtype), R2.to(device=R1.device, dtype=dtype))


def regularize_r(R: torch.Tensor, mu: float) -> torch.Tensor:
    """R of [X; sqrt(mu) I]: the factor of the mu-regularised objective.

    ``||X (W - W')^T||^2 + mu ||W - W'||^2`` equals the plain objective for X
    augmented with sqrt(mu) I, so regularisation is one more fold, no inverse.
    """
    mu = check_mu(mu)
    if mu == 0.0:
        return R
    n = R.shape[1]
    eye = torch.eye(n, dtype=R.dtype, device=R.device) * math.sqrt(mu)
    return fold_block(R, eye)


def svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(M, full_matrices=False)``, made to converge.

    LAPACK's divide-and-conquer SVD (gesdd, torch's only driver on the CPU) can stop with "failed
    to converge" on a valid matrix (a 1.5B model's residual W - A A^T W, float32, with 512
    calibration tokens). Then the SVD is taken of the triangular factor of M's QR, in float64
    (M = Q T, T = U' S V^T, so U = Q U'): the same singular triplets, a better-scaled problem.
    Results come back in M's dtype. LinAlgError only if that fails too.
    """
    try:
        return torch.linalg.svd(M, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    wide = M.shape[0] < M.shape[1]
    Q, T = torch.linalg.qr((M.mT if wide else M).to(torch.float64))
    U, S, Vh = torch.linalg.svd(T, full_matrices=False)
    U = Q @ U
    if wide:  # M^T = U S Vh, so M = Vh^T S U^T
        U, Vh = Vh.mT, U.mT
    return U.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype)


def coala_svd(
    W: torch.Tensor, R: torch.Tensor, mu: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of W R^T (with R regularised by mu).

    Returns U (m x k) and S (k,), k = min(m, rows of R), descending. The exact
    weighted error of the best rank-r approximation is sum_{i >= r} S_i^2
    (see ``tail_energy``); sum S_i^2 = ||X W^T||_F^2 (+ mu ||W||_F^2).
    Computed in the wider of W's and R's dtypes, at least float32.
    """
    W, R = _check_w_r(W, R)
    R = regularize_r(R, mu)
    U, S, _ = svd(W @ R.T)
    return U, S


def coala_factors(
    W: torch.Tensor,
    R: torch.Tensor,
    rank: int,
    mu: float = 0.0,
    *,
    return_singular_values: bool = False,
):
    """The rank-r minimiser of ||X (W - A B)^T||_F^2 + mu ||W - A B||_F^2.

    ``W R^T = U S V^T``; A = U_r (m x r, orthonormal columns), B = U_r^T W
    (r x n). Nothing is inverted, so a singular R (fewer tokens than features)
    or an ill-conditioned X is fine. When r exceeds rank(W R^T) the objective
    is already zero with fewer columns; the remaining columns of A are the top
    left singular vectors of the residual W - U U^T W, which keeps W' closest
    to W among the minimisers.

    Args:
        W: weight (m x n), any float dtype.
        R: triangular factor of the calibration inputs (k x n), e.g. from fold_r.
        rank: 1 <= rank <= min(m, n).
        mu: absolute regularisation mu >= 0 (appends sqrt(mu) I to X).
        return_singular_values: also return S, the singular values of W R^T.

    Returns:
        (A, B) or (A, B, S), in the working dtype (the wider of W's and R's,
        at least float32).
    """
    W, R = _check_w_r(W, R)
    check_rank(rank, *W.shape)
    U, S = coala_svd(W, R, mu)
    A = U[:, :rank]
    if rank > A.shape[1]:
        A = torch.cat([A, residual_directions(W, A, rank - A.shape[1])], dim=1)
    B = A.T @ W
    return (A, B, S) if return_singular_values else (A, B)


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product A @ B with the singular values split evenly between the factors.

    COALA's factors put all the scale in B (A = U_r has orthonormal columns). For
    LoRA training both factors should carry sqrt(S), as PiSSA's do: with A = Q P
    (QR of A) and P B = U S V^T, returns (Q U S^1/2, S^1/2 V^T). Costs one QR of
    A (m x r) and one SVD of an r x n matrix; no inverse.
    """
    check_matrix("A", A)
    check_matrix("B", B)
    if A.shape[1] != B.shape[0]:
        raise UsageError(f"B: expected {A.shape[1]} rows to match A's columns, got {B.shape[0]}")
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    Q, P = torch.linalg.qr(A.to(dtype))
    U, S, Vh = svd(P @ B.to(dtype))
    root = S.sqrt()
    return (Q @ U) * root, root.unsqueeze(1) * Vh


def tail_energy(S: torch.Tensor) -> torch.Tensor:
    """E[r] = sum_{i >= r} S_i^2 for r = 0..len(S): the squared error of each rank.

    Summed from the small end in float64 so tiny tails are not lost to rounding.
    """
    sq = S.detach().to(torch.float64).flip(0).square()
    tail = torch.cumsum(sq, 0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """SVD-LLM's rank for removing ``ratio`` of an (m x n) matrix's parameters.

    r = floor((1 - ratio) m n / (m + n)), at least 1; the factors then hold
    r (m + n) <= (1 - ratio) m n parameters.
    """
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise UsageError(f"ratio: expected a fraction of parameters to remove in (0, 1), got {ratio!r}")
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


# -- helpers -----------------------------------------------------------------


# Below this many columns one QR of [R; X] is faster than the panel loop's
# Python and small-kernel overhead (measured crossover ~256 on a 2-core EPYC).
_PANELED_MIN_COLUMNS = 256
# Panel width: wider panels make the trailing GEMMs more efficient, narrower
# ones shrink the panel QRs (level-2 BLAS) and the V_X^T V_X term (both ~ b/n
# of the work). 64 measured best or near it for n = 576..4096 (tools/bench_fold.py).
_PANEL = 64
# Width of the blocks whose reflectors update the columns after them at once (see
# _fold_under_r): 128 measured best of 128/256/512 at n = 1152, 2112, 3072 (t = 4096).
_OUTER = 128
# Rows of X per panel fold (see fold_block). n = 576, t = 16384 float32: 1.76x
# the Gram's time in one piece, 1.4x-1.5x in 4096-row pieces; no change at n = 1536.
_FOLD_ROWS = 4096


def _fold_under_r(R: torch.Tensor | None, X: torch.Tensor, panel: int = _PANEL,
                  outer: int = _OUTER) -> torch.Tensor:
    """R of [R; X] (n x n, signs not canonical) without re-factoring R's triangle.

    The triangular-pentagonal QR of LAPACK's tpqrt, in column panels of width
    b. Needs k + t >= n for R (k x n, upper-trapezoidal, or None) and X (t x n);
    R is padded with zero rows to n x n, which keeps it triangular.

    For each panel J: a Householder QR (geqrf) of the small stack [R_JJ; X_J]
    ((b + t) x b). R_JJ is triangular, so the zeros below its diagonal stay
    exactly zero and reflector i is e_i on the R rows: V = [I; V_X]. Applying
    Q^T = I - V T^T V^T to the trailing columns [R_J,rest; X_rest] then only
    touches R's b panel rows and X's t rows (never R's other rows), with two
    GEMMs: 2 t n^2 flops in all instead of 2 (n + t) n^2 for a QR of the stack.
    Every step is an orthogonal transformation of the data: no X^T X, no
    Cholesky, so the backward stability of Householder QR is kept.

    Two levels (as LAPACK blocks its QRs): the b-wide panels update only the
    columns of their ``outer``-wide block; the block's reflectors (still
    V = [I; V_X]: each panel's R rows are untouched by the panels before it)
    then update the columns after it at once, so the bulk of the flops is a
    rank-``outer`` GEMM instead of rank-b ones (1.1-1.3x less CPU at n =
    1152..3072, t = 4096, one thread: tools/bench_fold.py ``--panels 64/64,64/128``).

    T comes from T^-1 = triu(V^T V, 1) + diag(1 / tau) (Puglisi 1992; Joffrain
    et al., "Accumulating Householder transformations, revisited", 2006) where
    V^T V = I + V_X^T V_X; V_X^T V_X comes out of the same GEMM as V_X^T X_rest.
    """
    t, n = X.shape
    b = min(panel, n)
    outer = max(outer, b)
    Rw = X.new_zeros(n, n)
    if R is not None:
        Rw[: R.shape[0]] = R
    # Row i of buf is [b scratch entries | column i of X] (a copy we may overwrite).
    # Panel J's rows buf[J, b - w:] hold [R_JJ; X_J] transposed, so their .T is
    # the column-major matrix geqrf wants, contiguous for full panels: geqrf then
    # runs in place (torch's geqrf_out copies input into a Fortran-contiguous
    # out, a no-op here; otherwise, for the last panel, it works on a copy and
    # writes back), leaving V_X^T where X_J^T was.
    buf = X.new_empty(n, b + t)
    buf[:, b:] = X.T
    Xt = buf[:, b:]
    tau_all = X.new_empty(n)
    for J in range(0, n, outer):
        E = min(J + outer, n)
        for j in range(J, E, b):  # the block's own columns, panel by panel
            e = min(j + b, E)
            w = e - j
            P = buf[j:e, b - w:].T
            P[:w] = Rw[j:e, j:e]
            tau = tau_all[j:e]
            torch.geqrf(P, out=(P, tau))
            Rw[j:e, j:e] = P[:w].triu()
            if e < E:
                _apply_reflectors(Rw, Xt, j, e, E, tau)
        if E < n:  # the columns after the block, at once
            _apply_reflectors(Rw, Xt, J, E, n, tau_all[J:E])
    return Rw


def _apply_reflectors(Rw: torch.Tensor, Xt: torch.Tensor, j: int, e: int, stop: int,
                      tau: torch.Tensor) -> None:
    """Columns [e, stop) of [R; X] (R's rows j..e and X's rows, transposed in Xt) times
    Q^T = I - V T^T V^T of the reflectors of columns [j, e): V = [I; V_X], V_X^T = Xt[j:e]."""
    w = e - j
    Vt = Xt[j:e]  # V_X^T
    Y = Vt @ Xt[j:stop].T  # [V_X^T V_X | V_X^T X_rest]
    Tinv = Y[:, :w].triu(1)
    # tau_i = 0: reflector i is the identity (nothing left below the diagonal
    # in column i, e.g. rank-deficient X) and V_X's column i is exactly 0, so
    # row and column i of T^-1 are 0 off the diagonal: put 1 there to keep
    # it invertible, then T_ii = tau_i = 0 drops the reflector (T's diagonal
    # is 1 / diag(T^-1) = tau, so copying tau in changes nothing else).
    Tinv.diagonal().copy_(torch.where(tau == 0, 1.0, tau).reciprocal())
    eye = torch.eye(w, dtype=Xt.dtype, device=Xt.device)
    T = torch.linalg.solve_triangular(Tinv, eye, upper=True)  # w x w: cheaper than a
    T.diagonal().copy_(tau)  # triangular solve with the w x (stop - e) right-hand side
    W = T.T @ Y[:, w:].add_(Rw[j:e, e:stop])  # W = T^T V^T [R_J,rest; X_rest]
    Rw[j:e, e:stop] -= W
    Xt[e:stop].addmm_(W.T, Vt, alpha=-1.0)  # X_rest -= V_X W


def _canonical(R: torch.Tensor) -> torch.Tensor:
    """Flip rows so diag(R) >= 0: makes R unique for full-rank X."""
    k = min(R.shape)
    sign = torch.sign(torch.diagonal(R[:k, :k]))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return R[:k] * sign.unsqueeze(1)


def residual_directions(W: torch.Tensor, A: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` orthonormal columns orthogonal to A's (A: m x k, orthonormal columns), the
    top left singular vectors of the residual W - A A^T W first.

    When the residual has fewer than ``count`` nonzero singular values (W rank-deficient),
    its remaining singular vectors are arbitrary and may lie in span(A); a Householder QR
    of [A | U] makes them orthogonal to A (its Q is orthonormal whatever the rank), while
    the residual's nonzero directions, already orthogonal to A, are kept (up to sign).
    """
    residual = W - A @ (A.T @ W)
    U, _, _ = svd(residual)
    k = A.shape[1]
    Q, _ = torch.linalg.qr(torch.cat([A, U], dim=1), mode="complete" if k + U.shape[1] > W.shape[0] else "reduced")
    return Q[:, k:k + count]


NOT_FINITE = "holds NaN or Inf values; refusing to fold them into R"


def _cat(blocks: list[torch.Tensor]) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def prepare_block(block, name: str, n: int | None, dtype, device, *,
                  check_finite: bool = True) -> torch.Tensor:
    """Validate one block (2-D, float, n columns, finite) and upcast it on ``device``.

    Raises UsageError naming ``name``. Drivers that run their own loop around
    ``fold_block`` (reduce's checkpointed stream) use this for the same checks;
    ``check_finite=False`` leaves the NaN/Inf test to a driver that gets it from
    a pass over the data it makes anyway.
    """
    if not isinstance(block, torch.Tensor):
        raise UsageError(f"{name}: expected a torch.Tensor, got {type(block).__name__}")
    if block.ndim != 2:
        raise UsageError(f"{name}: expected a 2-D (tokens x n) tensor, got shape {tuple(block.shape)}")
    if block.dtype not in INPUT_DTYPES:
        raise UsageError(f"{name}: expected a float dtype {INPUT_DTYPES}, got {block.dtype}")
    if n is not None and block.shape[1] != n:
        raise UsageError(f"{name}: expected {n} columns, got {block.shape[1]}")
    X = block.to(device=device if device is not None else block.device, dtype=dtype)
    if check_finite and not bool(torch.isfinite(X).all()):
        raise UsageError(f"{name}: {NOT_FINITE}")
    return X


def _check_work_dtype(dtype) -> None:
    if dtype not in WORK_DTYPES:
        raise UsageError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")


def check_matrix(name: str, T) -> None:
    if not isinstance(T, torch.Tensor):
        raise UsageError(f"{name}: expected a torch.Tensor, got {type(T).__name__}")
    if T.ndim != 2:
        raise UsageError(f"{name}: expected a 2-D tensor, got shape {tuple(T.shape)}")
    if T.dtype not in INPUT_DTYPES:
        raise UsageError(f"{name}: expected a float dtype {INPUT_DTYPES}, got {T.dtype}")
    if not bool(torch.isfinite(T).all()):
        raise UsageError(f"{name}: holds NaN or Inf values")


def check_triangular(name: str, R) -> None:
    """UsageError unless R is a finite float matrix that is upper triangular (trapezoidal):
    the CPU fold reads only R's upper triangle, so a full matrix would be folded wrongly
    without a word (the CUDA QR reads all of it)."""
    check_matrix(name, R)
    below = torch.tril(R, diagonal=-1)
    if bool(below.any()):
        i, j = (int(v) for v in below.nonzero()[0])
        raise UsageError(f"{name}: expected an upper triangular (trapezoidal) factor such as "
                         f"fold_r returns, but entry ({i}, {j}) below the diagonal is "
                         f"{float(R[i, j]):.3g}; pass the R of a QR, not the data")


def _check_w_r(W, R) -> tuple[torch.Tensor, torch.Tensor]:
    check_matrix("W", W)
    check_matrix("R", R)
    if W.shape[1] != R.shape[1]:
        raise UsageError(
            f"R: expected {W.shape[1]} columns (W is {W.shape[0]} x {W.shape[1]}, out x in), "
            f"got R of shape {tuple(R.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(W.dtype, R.dtype), torch.float32)
    return W.to(dtype), R.to(device=W.device, dtype=dtype)


def check_rank(rank, m: int, n: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise UsageError(f"rank: expected an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise UsageError(f"rank: expected 1 <= rank <= min(m, n) = {min(m, n)} for W of {m} x {n}, got {rank}")


def check_mu(mu) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise UsageError(f"mu: expected a finite number >= 0, got {mu!r}")
    return float(mu)
