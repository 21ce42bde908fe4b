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
each window's gradient, ``p_wi = <g_w, D_i>``, gives the first-order change (their
mean) and an empirical-Fisher second-order term ``0.5 mean_w p_wi^2`` (``0.5 D_i^T F
D_i`` with ``F = mean_w g_w g_w^T``). That per-window Fisher sees a window's tokens
only through their mean gradient, so it underestimates a per-token Fisher roughly by
the window length; `position_fisher` estimates the per-token one from the layer's
inputs and output gradients in the same backward pass. docs/benchmarks.md measures how
each predicts the loss change of real drops.
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


def loss_estimates(P: torch.Tensor, Q: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per component: (first order, per-window Fisher term, per-token Fisher term).

    ``P`` (windows x k): the windows' `drop_projections`; ``Q`` (windows x k): their
    `position_fisher`. First order ``mean_w P``; ``0.5 mean_w P^2`` (``0.5 D^T F D`` with
    the per-window empirical Fisher); ``0.5 mean_w Q`` (with the per-token one; None
    without Q). --loss-terms fisher adds the last to the first."""
    P = P.to(torch.float64)
    token = None if Q is None else 0.5 * Q.to(torch.float64).mean(dim=0)
    return P.mean(dim=0), 0.5 * P.square().mean(dim=0), token


def position_fisher(U: torch.Tensor, UtW: torch.Tensor, X: torch.Tensor, dY: torch.Tensor,
                    positions: int) -> torch.Tensor:
    """``positions * sum_t (u_i^T dy_t)^2 (u_i^T W x_t)^2`` for every component i (k,).

    X (T x n): one window's inputs of the layer; dY (T x m): the gradient of the window's
    mean loss with respect to the layer's outputs; positions: the tokens that mean runs
    over. A token's own gradient is approximated by ``positions * dy_t x_t^T`` (its
    position's share of the backward pass), so this is ``D_i^T F D_i`` for the per-token
    empirical Fisher F of that window; `loss_estimates` averages it over windows. Cost
    O(T k (m + n)); no m x m or n x n matrix.
    """
    a = dY.to(U.dtype) @ U          # T x k: u_i^T dy_t
    b = X.to(U.dtype) @ UtW.T       # T x k: u_i^T W x_t
    return positions * (a.square() * b.square()).sum(dim=0)


def dropped_weight(W: torch.Tensor, U: torch.Tensor, drop: torch.Tensor | list[int],
                   step: float = 1.0) -> torch.Tensor:
    """``W + step * sum_{i in drop} D_i``: W with the components ``drop`` removed (step 1)
    or moved a fraction ``step`` of the way (finite differences of the score)."""
    Ud = U[:, torch.as_tensor(drop, dtype=torch.long)].to(W.dtype)
    return W - step * (Ud @ (Ud.T @ W))
