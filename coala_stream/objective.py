"""The propagated-input objective (issue 17), Gram-free, from one streamed R.

Pure functions on tensors (no files, no global state), in the conventions of
``linalg``: W is (m x n) = (out x in); inputs are rows. ``Xh`` (N x n) are a
layer's inputs in the already-compressed model, ``X`` (N x n) the same tokens'
inputs in the original model, and the target inputs are

    T = alpha X + (1 - alpha) Xh,        0 <= alpha <= 1.

For a rank r, the compressed weight W' = A B minimises

    ||T W^T - Xh W'^T||_F^2  (+ mu ||W - W'||_F^2).

alpha = 1 anchors W' Xh to the original outputs W X (AA-SVD's objective 4),
alpha = 0 asks W' to reproduce W on the shifted inputs (objective 3), and
Xh = X is the plain COALA objective of ``linalg.coala_factors``.

Nothing forms a Gram matrix. Fold the rows of [Xh | X] (N x 2n) with
``linalg.fold_r`` into R_full = [[R11, R12], [0, R22]] (upper-trapezoidal,
min(N, 2n) x 2n). Since [Xh | T] = [Xh | X] M with M = [[I, (1-alpha) I],
[0, alpha I]] and R_full M is still upper-trapezoidal, the factor of [Xh | T]
is R11, R12' = (1-alpha) R11 + alpha R12, R22' = alpha R22 (``target_r``;
no second QR). With [Xh | T] = Q [[R11, R12'], [0, R22']]:

    ||T W^T - Xh W'^T||^2 = ||R12' W^T - R11 W'^T||^2 + ||R22' W^T||^2,

so for W R12'^T = U S V^T the optimum is A = U_r, B^T = R11^-1 V_r S_r, and
the error of rank r is sum_{i >= r} S_i^2 + ||R22' W^T||^2 (a constant that
no rank can remove: the part of the target outside range(Xh)). How B is
computed, and what happens when R11 is singular, is in ``output_factors``.

mu appends the rows sqrt(mu) [I | I] to [Xh | X] (``regularize_pair``, one
more ``fold_block``): that adds mu ||W - W'||^2 and makes R11 nonsingular.

The narrow pair (issue 25). The solve reads X only through R12 W^T and R22 W^T, so
when the consumers of an input together have fewer outputs than inputs (a down_proj:
m = hidden < n = intermediate) the capture folds [Xh | Y] with Y = X W_g^T (W_g the
consumers' weights stacked, m_g x n) instead: n + m_g columns instead of 2n, a fold
of about 2 t (n + m_g)^2 flops instead of 2 t (2 n)^2. Its factor is
[[R11, C12], [0, C22]] with the same R11 (the QR of the first n columns does not see
the others), C12 = Q1^T Y = R12 W_g^T and ||C22||^2 = ||R22 W_g^T||^2 column by column,
so a consumer c (rows ``cols`` of W_g) reads C12[:, cols] where the wide pair computes
R12 W_c^T: the same objective, optimum and exact error (``OutputProblem(...,
outputs=...)`` with ``cols``). mu appends sqrt(mu) [I | W_c^T] to the consumer's
columns (the target rows of sqrt(mu) [I | I] times W_c^T).
"""

from __future__ import annotations

import math

import torch

from .errors import UsageError
from .linalg import check_matrix, check_mu, check_rank, fold_block, residual_directions, svd


__all__ = [
    "split_r",
    "target_r",
    "regularize_pair",
    "output_svd",
    "output_factors",
    "output_error",
    "relative_output_error",
    "OutputProblem",
]

# The condition-number estimate of R11 must be at least this far below 1 / rtol
# for the triangular solve; otherwise R11's SVD decides (see output_factors).
_COND_SAFETY = 10.0
# Between the two: R11's SVD would keep every direction (cond < 1 / rtol), so its
# answer is the triangular solve's, which float64 computes accurately there; the
# factor covers the estimate's shortfall (a lower bound).
_RANGE_SAFETY = 2.0
_ESTIMATE_ITERS = 6
_ESTIMATE_BLOCK = 4


def split_r(R_full: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks of R_full = [[R11, R12], [0, R22]], the factor of [Xh | X].

    Args:
        R_full: (k x 2n) upper-trapezoidal factor, e.g. ``fold_r`` of the rows
            of [Xh | X]; k = min(N, 2n) from a fold, any k accepted.
        n: the number of input features (columns of Xh).

    Returns:
        Views of R_full (no copy), with k1 = min(k, n):
        R11 (k1 x n, upper-trapezoidal: R of Xh), R12 (k1 x n, = Q1^T X),
        R22 (max(k - n, 0) x n, upper-trapezoidal; 0 rows when k <= n). With
        fewer tokens than features (k < n) R11 is a wide trapezoid, not square.
        R11^T R11 = Xh^T Xh, R11^T R12 = Xh^T X, R12^T R12 + R22^T R22 = X^T X.

    Raises:
        UsageError for a non-tensor, a width other than 2n, or nonzero entries
        below the diagonal (not a triangular factor).
    """
    _check_r_full(R_full, n)
    return R_full[:n, :n], R_full[:n, n:], R_full[n:, n:]


def target_r(R_full: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """The factor of [Xh | T], T = alpha X + (1 - alpha) Xh: R_full M, no QR.

    Returns a new (k x 2n) tensor [[R11, (1-alpha) R11 + alpha R12], [0, alpha R22]],
    upper-trapezoidal with diag >= 0 where R_full's is. Costs k n flops.
    """
    _check_r_full(R_full, n)
    return _mix(R_full, n, _check_alpha(alpha))


def regularize_pair(R_full: torch.Tensor, n: int, mu: float) -> torch.Tensor:
    """The factor of [Xh | X] with the rows sqrt(mu) [I | I] appended (one fold).

    Those rows add mu ||W - W'||_F^2 to the objective for every alpha (their T
    rows are sqrt(mu) I too), and give R11^T R11 = Xh^T Xh + mu I, so
    sigma_min(R11) >= sqrt(mu). mu = 0 returns R_full itself. Costs one
    ``fold_block`` of n rows of width 2n (about 2 (k + n) (2n)^2 flops).
    """
    _check_r_full(R_full, n)
    return _regularize(R_full, n, check_mu(mu))


def output_svd(
    W: torch.Tensor,
    R_full: torch.Tensor,
    alpha: float,
    mu: float = 0.0,
    *,
    rtol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD that solves every rank at once: W R12'^T = U S V^T.

    Args:
        W: weight (m x n), any float dtype.
        R_full: factor of [Xh | X] (k x 2n), see ``split_r``.
        alpha: target mix in [0, 1] (T = alpha X + (1 - alpha) Xh).
        mu: absolute regularisation >= 0 (``regularize_pair`` is applied here).
        rtol: relative threshold below which singular values of R11 count as
            zero (default max(k, n) * eps of the working dtype); see
            ``output_factors``. Unused when alpha = 0.

    Returns:
        (U, S, V, R11) in the working dtype (the wider of W's and R_full's, at
        least float32): U (m x q), S (q,) descending, V (k1 x q) with
        q = min(m, k1), and R11 (k1 x n), the regularised R of Xh. When R11 is
        numerically singular (alpha > 0, see ``output_factors``), U S V^T is
        W R12'^T P with P the orthogonal projector onto range(R11) (what
        W' R11^T can reach), q = min(m, numerical rank of R11).

        The error of rank r is exactly tail_energy(S)[r] + a constant (the
        rank-independent floor ||R22' W^T||^2, plus ||W R12'^T (I - P)||^2 in
        the singular case), so global rank allocation on S works unchanged.
    """
    check_matrix("W", W)
    problem = OutputProblem(R_full, W.shape[1], alpha, mu, rtol=rtol)
    U, S, V = problem.svd(W)
    return U, S, V, problem.working(W)[0]


def output_factors(
    W: torch.Tensor,
    R_full: torch.Tensor,
    rank: int,
    alpha: float,
    mu: float = 0.0,
    *,
    rtol: float | None = None,
    return_singular_values: bool = False,
):
    """The rank-r minimiser of ||T W^T - Xh (A B)^T||_F^2 + mu ||W - A B||_F^2.

    A = U_r (m x r, orthonormal columns) from ``output_svd``, and

        B^T = W^T A + alpha R11^+ (R12 - R11) W^T A,

    which equals R11^-1 V_r S_r when R11 is invertible (V_r S_r = R12' W^T A),
    but solves only for the input shift Q1^T (X - Xh) = R12 - R11: alpha = 0
    (and Xh = X) needs no solve and gives ``coala_factors(W, R11, r)`` exactly.

    Singular or ill-conditioned R11 (fewer tokens than features, duplicated or
    dead features in Xh, mu = 0): never inverted. The rule:

    - alpha = 0: no solve at all (B = A^T W, as ``coala_factors``).
    - alpha > 0: a cheap estimate of cond(R11) (a few triangular solves and
      products, O(n^2)) picks the triangular solve when cond(R11) is clearly
      below 1 / rtol (x 10), in the working dtype. When it is below 1 / rtol
      (x 2), the rule below would keep every direction and reduce to the same
      solve, which is then done in float64 (n^2 r flops, not R11's SVD: ~9 n^3;
      the answer is the same to rounding). Otherwise (and always when R11 has fewer rows than n)
      R11 = P_1 Sigma Q_1^T by SVD, singular values <= rtol * sigma_max count
      as zero, and the problem is solved exactly on range(R11): A = top-r
      left singular vectors of W R12'^T P_1 P_1^T (the target projected on
      what W' R11^T can reach), and R11^+ = Q_1 Sigma^-1 P_1^T in the formula
      above.

    Why not the minimum-norm least-squares B: along directions Xh does not
    span, the objective does not see B, and the minimum-norm solution sets W'
    to zero there, i.e. deletes the layer's response to features the
    calibration never excited. The formula above is instead the minimiser
    closest to W (||W - AB|| smallest among all minimisers with this A),
    which is the mu -> 0+ limit of the regularised solution, and the rule
    ``coala_factors`` already follows (B = U_r^T W). Directions with
    sigma_i(R11) <= rtol * sigma_max are noise in a working-precision R (its
    backward error is about eps * ||[Xh | X]||); solving on them would put
    noise / sigma_i, unbounded, into B. Pass mu > 0 to trade a little
    objective for a pull toward W instead.

    When rank exceeds the columns of U (rank > min(m, numerical rank of R11)),
    the objective is already at its floor; the remaining columns of A are the
    top left singular vectors of the residual W - U U^T W (as coala_factors).

    Cost: one SVD of an m x k1 matrix (as coala_factors); for alpha > 0 a triangular
    solve with r right-hand sides, or an SVD of R11 (k1 x n) when it is ill-conditioned.

    Args:
        W: weight (m x n), any float dtype.
        R_full: factor of [Xh | X] (k x 2n), see ``split_r``.
        rank: 1 <= rank <= min(m, n).
        alpha: target mix in [0, 1].
        mu: absolute regularisation >= 0.
        rtol: see ``output_svd``; must be in [0, 1).
        return_singular_values: also return S from ``output_svd``.

    Returns:
        (A, B) or (A, B, S) in the working dtype.

    Raises:
        UsageError for bad shapes, dtypes, alpha, mu, rtol or rank.
    """
    check_matrix("W", W)
    check_rank(rank, *W.shape)
    problem = OutputProblem(R_full, W.shape[1], alpha, mu, rtol=rtol)
    return problem.factors(W, rank, return_singular_values=return_singular_values)


def output_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, R_full: torch.Tensor,
                 alpha: float, mu: float = 0.0) -> float:
    """||T W^T - Xh (A B)^T||_F^2 + mu ||W - A B||_F^2, from R alone, in float64.

    = ||R12' W^T - R11 (A B)^T||^2 + ||R22' W^T||^2 (+ the mu rows, folded in
    by ``regularize_pair``). Costs O(k n (m + r)) flops.
    """
    _check_factors(W, A, B)
    return OutputProblem(R_full, W.shape[1], alpha, mu).error(W, A, B)[0]


def relative_output_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, R_full: torch.Tensor,
                          alpha: float, mu: float = 0.0) -> float:
    """``output_error`` divided by ||T W^T||_F^2 + mu ||W||_F^2 (0 when both are 0)."""
    _check_factors(W, A, B)
    return OutputProblem(R_full, W.shape[1], alpha, mu).relative_error(W, A, B)


# -- helpers -----------------------------------------------------------------


def _mix(R_full: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """``target_r`` without the checks."""
    out = R_full.clone()
    out[:, n:] = (1.0 - alpha) * R_full[:, :n] + alpha * R_full[:, n:]
    return out


def _regularize(R_full: torch.Tensor, n: int, mu: float) -> torch.Tensor:
    """``regularize_pair`` without the checks."""
    if mu == 0.0:
        return R_full
    eye = torch.eye(n, dtype=R_full.dtype, device=R_full.device) * math.sqrt(mu)
    return fold_block(R_full, torch.cat([eye, eye], dim=1))


class OutputProblem:
    """The output objective of one input: R_full of [Xh | X], alpha, mu and rtol, validated
    once and prepared once for every layer that reads that input (q/k/v, gate/up).

    ``outputs`` (the consumers' output widths, in the order their rows are stacked in W_g):
    R_full is instead the factor of the narrow pair [Xh | X W_g^T] (module docstring), and
    every layer method takes ``cols``, the rows of W_g that are this layer's W.

    What depends on the input alone is computed at first use and kept: the regularised
    R11 and R12 in the working dtype (``working``), the choice between the triangular
    solve and R11's SVD with the SVD itself (``_solver``), and the float64 target factor
    of the error (``_target64``). Layer methods (``svd``, ``factors``, ``error``,
    ``relative_error``) check only W (and A, B); they return what ``output_svd``,
    ``output_factors``, ``output_error`` and ``relative_output_error`` return.
    """

    def __init__(self, R_full: torch.Tensor, n: int, alpha: float, mu: float = 0.0, *,
                 rtol: float | None = None, outputs=None):
        self.outputs = _check_outputs(outputs)
        _check_r_full(R_full, n, self.outputs)
        self.R_full, self.n = R_full, n
        self.alpha, self.mu = _check_alpha(alpha), check_mu(mu)
        if rtol is not None and (
            isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 <= rtol < 1.0
        ):
            raise UsageError(f"rtol: expected None or a number in [0, 1), got {rtol!r}")
        self.rtol = rtol
        self._working: dict = {}  # (dtype, device) -> (R11, R12)
        self._solvers: dict = {}  # (dtype, device) -> solver (see _solver)
        self._paths: dict = {}  # (dtype, device) -> its name (see ``path``)
        self._target: dict = {}  # device -> float64 target factor
        self._narrow: dict = {}  # (dtype, device, cols) -> (R11, C12, C22) of a narrow pair

    def working(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R11, R12) of the regularised factor in the working dtype of W (the wider of W's
        and R_full's, at least float32), on W's device."""
        dtype = torch.promote_types(torch.promote_types(W.dtype, self.R_full.dtype),
                                    torch.float32)
        key = (dtype, W.device)
        if key not in self._working:
            if self.outputs is not None:  # R11 only: the consumers' columns come per layer
                self._working[key] = (self._layer(dtype, W.device, None, W)[0], None)
                return self._working[key]
            R = self.R_full.to(device=W.device, dtype=dtype)
            R = _regularize(R, self.n, self.mu)
            self._working[key] = (R[:self.n, :self.n], R[:self.n, self.n:])
        return self._working[key]

    def _layer(self, dtype, device, cols: slice | None, W: torch.Tensor):
        """(R11, C12, C22) of a narrow pair for the consumer at rows ``cols`` of W_g (W its
        weight), regularised: R11 (k1 x n), C12 = R12 W^T (k1 x m), C22 with
        ||C22||^2 = ||R22 W^T||^2. ``cols`` None: the R11 of the first n columns alone."""
        key = (dtype, device, None if cols is None else (cols.start, cols.stop))
        if key not in self._narrow:
            n = self.n
            R = self.R_full.to(device=device, dtype=dtype)
            idx = torch.arange(n, device=device)
            if cols is not None:
                idx = torch.cat([idx, torch.arange(n + cols.start, n + cols.stop, device=device)])
            R = R[:, idx]
            if self.mu:
                # the rows sqrt(mu) [I | W^T]: their target rows sqrt(mu) [I | I] times W^T
                eye = torch.eye(n, dtype=dtype, device=device) * math.sqrt(self.mu)
                extra = eye if cols is None else torch.cat(
                    [eye, math.sqrt(self.mu) * W.to(device=device, dtype=dtype).T], dim=1)
                R = torch.linalg.qr(torch.cat([R, extra]), mode="r").R
                sign = torch.ones(R.shape[0], dtype=dtype, device=device)
                sign[:n] = torch.where(torch.diagonal(R[:n, :n]) < 0, -1.0, 1.0)
                R = R * sign.unsqueeze(1)  # diag(R11) >= 0, as every fold leaves it
            self._narrow[key] = (R[:n, :n], R[:n, n:], R[n:, n:])
        return self._narrow[key]

    def _cols(self, W: torch.Tensor, cols) -> slice | None:
        """``cols`` checked against the form: None for the wide pair, W's rows of W_g for a
        narrow one."""
        if self.outputs is None:
            if cols is not None:
                raise UsageError("cols: only a narrow pair (outputs=...) has per-layer columns")
            return None
        total = sum(self.outputs)
        if not isinstance(cols, slice) or cols.step not in (None, 1) or cols.start is None \
                or not 0 <= cols.start < cols.stop <= total:
            raise UsageError(f"cols: expected a slice of the {total} stacked outputs of the "
                             f"narrow pair, got {cols!r}")
        if cols.stop - cols.start != W.shape[0]:
            raise UsageError(f"W: expected {cols.stop - cols.start} rows (cols {cols.start}:"
                             f"{cols.stop} of the narrow pair), got shape {tuple(W.shape)}")
        return cols

    def svd(self, W: torch.Tensor, cols: slice | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, V) of ``output_svd``."""
        self._check_w(W)
        return self._svd(W, self._cols(W, cols))

    def _svd(self, W, cols=None):
        R11, R12 = self.working(W)
        W = W.to(R11.dtype)
        if self.alpha == 0.0:
            U, S, Vh = svd(W @ R11.T)
            return U, S, Vh.T
        if self.outputs is None:
            G = W @ ((1.0 - self.alpha) * R11 + self.alpha * R12).T
        else:
            C12 = self._layer(R11.dtype, R11.device, cols, W)[1]
            G = (1.0 - self.alpha) * (W @ R11.T) + self.alpha * C12.T
        P1 = self._solver(W)[2]
        if P1 is None:
            U, S, Vh = svd(G)
            return U, S, Vh.T
        U, S, Vh = svd(G @ P1)
        return U, S, P1 @ Vh.T

    def factors(self, W: torch.Tensor, rank: int, *, return_singular_values: bool = False,
                cols: slice | None = None):
        """(A, B) or (A, B, S) of ``output_factors``."""
        self._check_w(W)
        cols = self._cols(W, cols)
        check_rank(rank, *W.shape)
        U, S, _ = self._svd(W, cols)
        W = W.to(U.dtype)
        A = U[:, :rank]
        if rank > A.shape[1]:
            A = torch.cat([A, residual_directions(W, A, rank - A.shape[1])], dim=1)
        Bt = W.T @ A
        if self.alpha != 0.0:
            shift, pinv, _ = self._solver(W)
            if shift is None:  # narrow pair: (R12 - R11) W^T A = C12 A - R11 W^T A
                R11, C12, _ = self._layer(A.dtype, A.device, cols, W)
                Bt = Bt + self.alpha * pinv(C12 @ A - R11 @ Bt)
            else:
                Bt = Bt + self.alpha * pinv(shift @ Bt)
        B = Bt.T.contiguous()
        return (A, B, S) if return_singular_values else (A, B)

    def error(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              cols: slice | None = None) -> tuple[float, float]:
        """(``output_error``, ||T W^T||_F^2 + mu ||W||_F^2), both in float64: the products
        R12' W^T and R22' W^T serve both sums."""
        _check_factors(W, A, B)
        self._check_w(W)
        cols = self._cols(W, cols)
        n, F64 = self.n, torch.float64
        Wd, Ad, Bd = W.to(F64), A.to(device=W.device, dtype=F64), B.to(device=W.device, dtype=F64)
        if self.outputs is None:
            Rt = self._target64(W.device)
            R11 = Rt[:n, :n]
            G = Rt[:n, n:] @ Wd.T
            floor = float(torch.linalg.norm(Rt[n:, n:] @ Wd.T) ** 2)
        else:
            R11, C12, C22 = self._layer(F64, W.device, cols, W)
            G = (1.0 - self.alpha) * (R11 @ Wd.T) + self.alpha * C12
            floor = self.alpha ** 2 * float(torch.linalg.norm(C22) ** 2)
        D = G - (R11 @ Bd.T) @ Ad.T
        return (float(torch.linalg.norm(D) ** 2) + floor,
                float(torch.linalg.norm(G) ** 2) + floor)

    def relative_error(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       cols: slice | None = None) -> float:
        """``relative_output_error``."""
        err, total = self.error(W, A, B, cols)
        return err / total if total > 0 else 0.0

    def _check_w(self, W) -> None:
        check_matrix("W", W)
        if W.shape[1] != self.n:
            raise UsageError(f"W: expected {self.n} columns (the input features of R_full), "
                             f"got shape {tuple(W.shape)}")

    def _target64(self, device) -> torch.Tensor:
        if device not in self._target:
            R = _regularize(self.R_full.to(device=device, dtype=torch.float64), self.n, self.mu)
            self._target[device] = _mix(R, self.n, self.alpha)
        return self._target[device]

    def _solver(self, W: torch.Tensor):
        """(R12 - R11 (None for a narrow pair), R11^+ as a function, P1): the triangular solve when R11 is clearly
        nonsingular (P1 None; in float64 when only that precision makes it accurate), else
        R11's SVD restricted to its numerical range (P1 its left singular vectors). Once
        per working dtype and device."""
        R11, R12 = self.working(W)
        key = (R11.dtype, R11.device)
        if key not in self._solvers:
            rtol = self.rtol
            if rtol is None:
                rtol = max(R11.shape) * torch.finfo(R11.dtype).eps
            shift = None if R12 is None else R12 - R11  # narrow: per layer (`factors`)
            if _nonsingular(R11, rtol):
                self._solvers[key] = (shift, _triangular_solve(R11), None)
                self._paths[key] = "triangular"
            elif (R11.dtype != torch.float64 and R11.shape[0] >= R11.shape[1]
                  and _nonsingular(R64 := R11.double(), rtol, _RANGE_SAFETY)):
                # rtol stays the working dtype's: it is the accuracy of R11's own entries
                self._solvers[key] = (shift, _triangular_solve(R64, R11.dtype), None)
                self._paths[key] = "triangular in float64"
            else:
                R64 = None  # not held through the SVD (n^2 doubles: 640 MB at n = 8960)
                P1, sig, Q1h = svd(R11)
                keep = sig > rtol * sig[0] if sig.numel() and float(sig[0]) > 0 else sig > 0
                p = int(keep.sum())
                self._solvers[key] = (shift, _range_solve(P1[:, :p], sig[:p], Q1h[:p].T),
                                      P1[:, :p])
                self._paths[key] = f"SVD of R11 (range {p} of {R11.shape[1]})"
        return self._solvers[key]

    def path(self, dtype: torch.dtype = torch.float32, device="cpu") -> str | None:
        """How R11 was solved in that working dtype and device ("triangular", "triangular
        in float64", "SVD of R11 (range p of n)"); None before a layer with alpha > 0 asked."""
        return self._paths.get((dtype, torch.device(device)))


def _triangular_solve(R11, dtype=None):
    """R11^-1 as a function; ``dtype``: the answer's dtype when R11 is wider (float64)."""
    if dtype is None:
        def pinv(Y):
            return torch.linalg.solve_triangular(R11, Y, upper=True)
    else:
        def pinv(Y):
            return torch.linalg.solve_triangular(R11, Y.to(R11.dtype), upper=True).to(dtype)
    return pinv


def _range_solve(P1, sig, Q1):
    def pinv(Y):
        return Q1 @ ((P1.T @ Y) / sig.unsqueeze(1))
    return pinv


def _check_factors(W, A, B) -> None:
    check_matrix("W", W)
    check_matrix("A", A)
    check_matrix("B", B)
    m, n = W.shape
    if A.shape[0] != m or B.shape[1] != n or A.shape[1] != B.shape[0]:
        raise UsageError(
            f"A, B: expected (m x r) and (r x n) factors for W of {m} x {n}, "
            f"got {tuple(A.shape)} and {tuple(B.shape)}"
        )


def _nonsingular(R11: torch.Tensor, rtol: float, safety: float = _COND_SAFETY) -> bool:
    """True when the triangle R11 is clearly well-conditioned: cond(R11) * safety < 1 / rtol.

    A wide trapezoid (fewer rows than columns) or a pivot <= rtol * max pivot
    is singular at once (cond >= max|d_i| / min|d_i| for a triangle). Otherwise
    block power iterations estimate sigma_max(R11) and sigma_max(R11^-1) (lower
    bounds that converge fast; the safety factor 10 covers the shortfall). An
    underestimate only matters near the threshold, where the solve is still
    finite; a (near-)singular R11 makes the inverse iteration blow up (inf or
    huge), which is caught.
    """
    k, n = R11.shape
    if k < n or n == 0:
        return k >= n
    d = torch.diagonal(R11).abs()
    dmax = float(d.max())
    if not dmax > 0 or float(d.min()) <= rtol * dmax:
        return False
    limit = 1.0 / (max(rtol, torch.finfo(R11.dtype).eps) * safety)
    g = torch.Generator().manual_seed(0)
    Z0 = torch.randn(n, min(_ESTIMATE_BLOCK, n), generator=g, dtype=torch.float64)
    Z0 = torch.linalg.qr(Z0).Q.to(device=R11.device, dtype=R11.dtype)
    Z = Z0
    for _ in range(_ESTIMATE_ITERS):
        Z = torch.linalg.qr(R11.T @ (R11 @ Z)).Q
    smax = float(torch.linalg.matrix_norm(R11 @ Z, 2))
    Z = Z0
    with torch.no_grad():
        for _ in range(_ESTIMATE_ITERS):
            Y = torch.linalg.solve_triangular(R11.T, Z, upper=False)
            Z = torch.linalg.solve_triangular(R11, Y, upper=True)
            if not bool(torch.isfinite(Z).all()):
                return False
            Z = torch.linalg.qr(Z).Q
        Y = torch.linalg.solve_triangular(R11.T, Z, upper=False)
        if not bool(torch.isfinite(Y).all()):
            return False
        inv_norm = float(torch.linalg.matrix_norm(Y, 2))
    return math.isfinite(inv_norm) and smax * inv_norm < limit


def _check_r_full(R_full, n, outputs: tuple[int, ...] | None = None) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"n: expected a positive int (the input features of W), got {n!r}")
    check_matrix("R_full", R_full)
    if outputs is not None:
        if R_full.shape[1] != n + sum(outputs):
            raise UsageError(
                f"R_full: expected n + sum(outputs) = {n + sum(outputs)} columns (the factor "
                f"of the narrow pair [Xh | X W_g^T] for n = {n}), got shape {tuple(R_full.shape)}")
    elif R_full.shape[1] != 2 * n:
        raise UsageError(
            f"R_full: expected 2n = {2 * n} columns (the factor of [Xh | X] for n = {n} "
            f"input features), got shape {tuple(R_full.shape)}"
        )
    if bool((torch.tril(R_full, -1) != 0).any()):
        raise UsageError(
            "R_full: expected an upper-trapezoidal factor (the R of a QR of [Xh | X], e.g. "
            "fold_r of its rows); found nonzero entries below the diagonal"
        )


def _check_outputs(outputs) -> tuple[int, ...] | None:
    if outputs is None:
        return None
    try:
        got = tuple(outputs)
    except TypeError:
        got = None
    if not got or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in got):
        raise UsageError(f"outputs: expected None or positive ints (the consumers' output "
                         f"widths), got {outputs!r}")
    return got


def _check_alpha(alpha) -> float:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or not 0.0 <= alpha <= 1.0
    ):
        raise UsageError(
            f"alpha: expected a number in [0, 1] (T = alpha X + (1 - alpha) Xh), got {alpha!r}"
        )
    return float(alpha)

