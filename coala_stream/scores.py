"""What dropping one singular component does to the model's loss: ZS-SVD's score, Gram-free.

Pure math, tensors in and out. With R from the plain capture (R^T R = X^T X) and
``W R^T = U S V^T``, COALA keeps ``W' = U_r U_r^T W``; dropping component i changes W
by ``D_i = -u_i (u_i^T W)``. Its effect on the layer's calibration error is s_i^2
(the spectrum's tail, what `--allocate global` balances); its effect on the model's
calibration loss L is, to first order, ``<G, D_i> = -u_i^T G W^T u_i`` with G = dL/dW.
ZS-SVD writes the same number as ``-s_i u_i^T (G L^-T) v_i`` with a whitening
factor L (a triangular solve per layer); since ``s_i v_i = R W^T u_i`` the
inverse cancels, so here nothing is inverted and no Gram matrix is formed.

With L the mean of the windows' losses L_w and g_w = dL_w/dW, the same projection of
each window's gradient, ``p_wi = <g_w, D_i>``, gives both the first-order change
(their mean) and an empirical-Fisher second-order term ``0.5 mean_w p_wi^2``
(``0.5 D_i^T F D_i`` with ``F = mean_w g_w g_w^T``). A per-window Fisher is a
coarse curvature estimate (it sees a window's tokens only through their mean
gradient, so it underestimates a per-token Fisher roughly by the window length);
docs/benchmarks.md measures how either predicts the loss change of real drops.
"""

from __future__ import annotations

import torch

from .linalg import coala_svd


def components(W: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, U^T W) of the plain COALA solve: U (m x k) the left singular vectors of
    W R^T, S (k,) its singular values (descending), U^T W (k x n) the rows a kept
    component contributes to B. Float32 at least (`linalg.coala_svd`)."""
    U, S = coala_svd(W, R)
    return U, S, U.T @ W.to(U.dtype)


def drop_projections(U: torch.Tensor, UtW: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``<G, D_i> = -u_i^T G W^T u_i`` for every component i at once (k,), as
    ``-sum_j (U^T G)_ij (U^T W)_ij``: O(k m n), no m x m or n x n product."""
    G = G.to(U.dtype)
    return -((U.T @ G) * UtW).sum(dim=1)


def loss_estimates(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first order, second-order term) per component from ``P`` (windows x k), the
    windows' `drop_projections`: ``mean_w P`` and ``0.5 mean_w P^2`` (empirical Fisher
    along D_i); the predicted change of dropping i is their sum with --loss-terms fisher."""
    P = P.to(torch.float64)
    return P.mean(dim=0), 0.5 * P.square().mean(dim=0)


def dropped_weight(W: torch.Tensor, U: torch.Tensor, drop: torch.Tensor | list[int],
                   step: float = 1.0) -> torch.Tensor:
    """``W + step * sum_{i in drop} D_i``: W with the components ``drop`` removed (step 1)
    or moved a fraction ``step`` of the way (finite differences of the score)."""
    Ud = U[:, torch.as_tensor(drop, dtype=torch.long)].to(W.dtype)
    return W - step * (Ud @ (Ud.T @ W))
