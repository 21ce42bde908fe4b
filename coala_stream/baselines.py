"""Baselines for comparison: what peers do, implemented as they do it.

Pure functions on tensors. These are here to be measured against COALA, not
recommended: SVD-LLM's whitening forms and factors the Gram matrix X^T X,
which squares cond(X) and fails (or silently loses accuracy) once cond(X)
passes about 1/sqrt(eps) of the working precision.

- ``svd_factors``: truncated SVD of W alone (data-free).
- ``svdllm_factors``: SVD-LLM (Wang et al., 2024): Cholesky S of the Gram
  matrix, SVD of W S, multiply back by S^-1; when Cholesky fails, the
  diagonal damping peers use (shift by the most negative eigenvalue plus a
  small multiple of the mean diagonal, then retry with growing damping).
- ``asvd_factors``: ASVD (Yuan et al., 2023): scale columns by
  diag(mean |x|)^alpha, SVD, unscale.
- ``aasvd_factors``: AA-SVD (Sinha & Fleuret, 2026, arXiv 2604.02119): the
  propagated-input objective ||T W^T - Xh W'^T|| from the Gram matrices of
  the compressed-model inputs Xh and the original inputs X, with Cholesky of
  Xh^T Xh and explicit inverses; ``objective.output_factors`` is the
  Gram-free counterpart.

All return (A, B) with W' = A @ B, A (m x r), B (r x n), each carrying
sqrt of the kept singular values so both factors have similar scale.
"""

from __future__ import annotations

import warnings

import torch

from .errors import UsageError
from .linalg import check_matrix, check_rank, svd


class NumericalFallbackWarning(RuntimeWarning):
    """A baseline hit a numerical failure and fell back (e.g. damped Cholesky)."""


def svd_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation of W in the plain Frobenius norm (no data)."""
    check_matrix("W", W)
    check_rank(rank, *W.shape)
    Wf = W.to(torch.promote_types(W.dtype, torch.float32))
    U, S, Vh = svd(Wf)
    return _split(U[:, :rank], S[:rank], Vh[:rank])


def svdllm_factors(
    W: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    max_damping_tries: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM truncation-aware whitening from the Gram matrix G = X^T X (n x n).

    G = S S^T (Cholesky, in ``dtype``); W S = U Sigma V^T;
    W' = U_r Sigma_r V_r^T S^-1 with the explicit inverse of S, as SVD-LLM does.
    On Cholesky failure: damped retries, with a ``NumericalFallbackWarning``.
    Raises ``torch.linalg.LinAlgError`` if all damping tries fail.
    """
    check_matrix("W", W)
    check_matrix("gram", gram)
    n = W.shape[1]
    if gram.shape != (n, n):
        raise UsageError(f"gram: expected ({n}, {n}) for W of {tuple(W.shape)}, got {tuple(gram.shape)}")
    check_rank(rank, *W.shape)
    G = gram.to(dtype)
    S = _damped_cholesky(G, max_damping_tries)
    Wd = W.to(dtype)
    U, sig, Vh = svd(Wd @ S)
    S_inv = torch.linalg.inv(S)
    return _split(U[:, :rank], sig[:rank], Vh[:rank] @ S_inv)


def asvd_factors(
    W: torch.Tensor,
    abs_mean: torch.Tensor,
    rank: int,
    *,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD activation-aware SVD: scale the input columns of W by mean|x|^alpha.

    ``abs_mean`` (n,) is the mean absolute input per feature. Features that
    were never active (mean 0) get a floor of 1e-6 x the largest scale, so the
    unscaling never divides by zero.
    """
    check_matrix("W", W)
    check_rank(rank, *W.shape)
    n = W.shape[1]
    if not isinstance(abs_mean, torch.Tensor) or abs_mean.shape != (n,):
        raise UsageError(f"abs_mean: expected a tensor of shape ({n},), got {getattr(abs_mean, 'shape', type(abs_mean))}")
    if not bool(torch.isfinite(abs_mean).all()) or bool((abs_mean < 0).any()):
        raise UsageError("abs_mean: expected finite, non-negative values")
    dtype = torch.promote_types(W.dtype, torch.float32)
    scale = abs_mean.to(dtype).pow(alpha)
    scale = torch.clamp(scale, min=float(scale.max()) * 1e-6 if float(scale.max()) > 0 else 1.0)
    U, S, Vh = svd(W.to(dtype) * scale)
    return _split(U[:, :rank], S[:rank], Vh[:rank] / scale)


def aasvd_factors(
    W: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    alpha: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    max_damping_tries: int = 8,
    cols: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AA-SVD from the 2n x 2n Gram matrix of [Xh | X], as its authors compute it.

    ``cols``: ``gram`` is instead that of the narrow pair [Xh | X W_g^T] (`objective`), and
    W is rows ``cols`` of W_g: W X^T Xh is then read from the Gram matrix directly.

    ``gram`` = [Xh | X]^T [Xh | X] holds C = Xh^T Xh (top left) and
    X^T Xh (bottom left). With T = alpha X + (1 - alpha) Xh,
    T^T Xh = alpha X^T Xh + (1 - alpha) C. C = S S^T (Cholesky in ``dtype``,
    damped on failure with a ``NumericalFallbackWarning``);
    W* S = W (T^T Xh) S^-T with the explicit inverse of S^T (W* = W T^T Xh C^-1
    is the unconstrained optimum); W* S = U Sigma V^T; W' = U_r Sigma_r V_r^T S^-1.
    alpha = 1 is the paper's objective 4 (AA-SVD), alpha = 0 objective 3.
    Raises ``torch.linalg.LinAlgError`` if all damping tries fail.
    """
    check_matrix("W", W)
    check_matrix("gram", gram)
    n = W.shape[1]
    narrow = cols is not None
    width = gram.shape[0] if narrow else 2 * n
    if gram.shape != (width, width) or (narrow and not (
            isinstance(cols, slice) and cols.stop - cols.start == W.shape[0]
            and n + cols.stop <= width)):
        raise UsageError(
            f"gram: expected the ({2 * n}, {2 * n}) Gram matrix of [Xh | X] for W of "
            f"{tuple(W.shape)} (or, with cols, that of [Xh | X W_g^T] holding W's rows), got "
            f"{tuple(gram.shape)} and cols={cols!r}"
        )
    check_rank(rank, *W.shape)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    G = gram.to(dtype)
    C = G[:n, :n]
    Wd = W.to(dtype)
    if narrow:  # W X^T Xh is the block (X W^T)^T Xh of [Xh | X W_g^T]'s Gram
        WT = alpha * G[n + cols.start:n + cols.stop, :n] + (1.0 - alpha) * (Wd @ C)
    else:
        WT = Wd @ (alpha * G[n:, :n] + (1.0 - alpha) * C)  # W T^T Xh
    S = _damped_cholesky(C, max_damping_tries)
    S_inv_T = torch.linalg.inv(S.T)
    U, sig, Vh = svd(WT @ S_inv_T)
    return _split(U[:, :rank], sig[:rank], Vh[:rank] @ S_inv_T.T)


def _damped_cholesky(G: torch.Tensor, tries: int) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return L
    # SVD-LLM shifts by the most negative eigenvalue; GPTQ-style pipelines add a
    # fraction of the mean diagonal. Do the first, then grow the second.
    eig_min = float(torch.linalg.eigvalsh(G).min())
    mean_diag = float(torch.diagonal(G).mean().abs()) or 1.0
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    damp = max(-eig_min, 0.0) + 1e-6 * mean_diag
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(G + damp * eye)
        if int(info) == 0:
            warnings.warn(
                f"Gram matrix not positive definite in {G.dtype}; Cholesky succeeded after "
                f"damping by {damp:.3g} ({damp / mean_diag:.2g} x mean diagonal)",
                NumericalFallbackWarning,
                stacklevel=3,
            )
            return L
        damp *= 10.0
    raise torch.linalg.LinAlgError(
        f"Cholesky of the Gram matrix failed even with damping {damp / 10:.3g}"
    )


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    root = S.clamp(min=0).sqrt()
    return U * root, root.unsqueeze(1) * Vh
