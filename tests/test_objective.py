"""The propagated-input objective: identities, optimality and the singular-R11 rule.

References are computed directly from the data (Xh, X) in float64, never from R.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from coala_stream import objective
from coala_stream.baselines import NumericalFallbackWarning, aasvd_factors
from coala_stream.errors import UsageError
from coala_stream.linalg import coala_factors, fold_r, tail_energy
from coala_stream.objective import (
    output_error,
    output_factors,
    output_svd,
    regularize_pair,
    relative_output_error,
    split_r,
    target_r,
)

from .test_linalg import log_spectrum, spectrum_matrix

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64
ALPHAS = [0.0, 0.3, 1.0]


def data(m=24, n=16, N=200, seed=0, drift=0.3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=F64)
    Xh = X + drift * torch.randn(N, n, generator=g, dtype=F64)
    W = torch.randn(m, n, generator=g, dtype=F64)
    return W, X, Xh


def r_full(Xh, X, dtype=F64):
    return fold_r([torch.cat([Xh, X], dim=1).to(dtype)], dtype=dtype)


def direct(W, X, Xh, A, B, alpha, mu=0.0):
    """||T W^T - Xh (AB)^T||^2 + mu ||W - AB||^2 in float64, from the data."""
    W, X, Xh = W.to(F64), X.to(F64), Xh.to(F64)
    Wp = A.to(F64) @ B.to(F64)
    T = alpha * X + (1 - alpha) * Xh
    return float(torch.linalg.norm(T @ W.T - Xh @ Wp.T) ** 2 + mu * torch.linalg.norm(W - Wp) ** 2)


def reference(W, X, Xh, rank, alpha, rtol=1e-12):
    """Float64 optimum from the data: SVD of Xh (rank p), whitened target, and the
    minimiser closest to W along the directions Xh does not span."""
    T = alpha * X + (1 - alpha) * Xh
    Uh, Sh, Vhh = torch.linalg.svd(Xh, full_matrices=False)
    p = int((Sh > rtol * Sh[0]).sum())
    Up, Sp, Vp = Uh[:, :p], Sh[:p], Vhh[:p].T
    a, s, bh = torch.linalg.svd(W @ T.T @ Up, full_matrices=False)  # M = W T^T Up (m x p)
    A = a[:, :rank]
    Bt = Vp @ ((bh[:rank].T * s[:rank]) / Sp.unsqueeze(1)) + (W.T @ A - Vp @ (Vp.T @ (W.T @ A)))
    return A, Bt.T


# -- R blocks ------------------------------------------------------------------


@pytest.mark.parametrize("N", [200, 24, 10])  # N >= 2n, n <= N < 2n, N < n
def test_split_r_blocks_hold_the_three_grams(N):
    W, X, Xh = data(N=N)
    n = X.shape[1]
    R11, R12, R22 = split_r(r_full(Xh, X), n)
    assert R11.shape == R12.shape == (min(N, n), n)
    assert R22.shape == (max(min(N, 2 * n) - n, 0), n)
    torch.testing.assert_close(R11.T @ R11, Xh.T @ Xh)
    torch.testing.assert_close(R11.T @ R12, Xh.T @ X)
    torch.testing.assert_close(R12.T @ R12 + R22.T @ R22, X.T @ X)


@pytest.mark.parametrize("N", [200, 24, 10])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_target_r_is_the_factor_of_xh_and_t(N, alpha):
    W, X, Xh = data(N=N)
    n = X.shape[1]
    Rt = target_r(r_full(Xh, X), n, alpha)
    Z = torch.cat([Xh, alpha * X + (1 - alpha) * Xh], dim=1)
    assert bool((torch.tril(Rt, -1) == 0).all())
    torch.testing.assert_close(Rt.T @ Rt, Z.T @ Z)


# -- the objective from R ------------------------------------------------------------


@pytest.mark.parametrize("N", [200, 24, 10])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("mu", [0.0, 0.7])
def test_output_error_from_r_equals_the_direct_objective(N, alpha, mu):
    W, X, Xh = data(N=N, seed=1)
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(24, 5, generator=g, dtype=F64), torch.randn(5, 16, generator=g, dtype=F64)
    R = r_full(Xh, X)
    expected = direct(W, X, Xh, A, B, alpha, mu)
    assert output_error(W, A, B, R, alpha, mu) == pytest.approx(expected, rel=1e-12)
    T = alpha * X + (1 - alpha) * Xh
    total = float(torch.linalg.norm(T @ W.T) ** 2 + mu * torch.linalg.norm(W) ** 2)
    assert relative_output_error(W, A, B, R, alpha, mu) == pytest.approx(expected / total, rel=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_output_factors_match_the_closed_form_optimum(alpha, rank):
    W, X, Xh = data(seed=3)
    A, B = output_factors(W, r_full(Xh, X), rank, alpha)
    A_ref, B_ref = reference(W, X, Xh, rank, alpha)
    best = direct(W, X, Xh, A_ref, B_ref, alpha)
    assert direct(W, X, Xh, A, B, alpha) == pytest.approx(best, rel=1e-12)
    torch.testing.assert_close(A @ B, A_ref @ B_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(A.T @ A, torch.eye(rank, dtype=F64))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_output_factors_beat_random_rank_r_perturbations(alpha):
    W, X, Xh = data(seed=4)
    A, B = output_factors(W, r_full(Xh, X), 6, alpha)
    best = direct(W, X, Xh, A, B, alpha)
    g = torch.Generator().manual_seed(5)
    for scale in (1e-6, 1e-3, 1e-1):
        for _ in range(10):
            A2 = A + scale * torch.randn(A.shape, generator=g, dtype=F64)
            B2 = B + scale * torch.randn(B.shape, generator=g, dtype=F64)
            assert direct(W, X, Xh, A2, B2, alpha) >= best * (1 - 1e-13)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("N", [200, 10])
def test_xh_equal_x_reproduces_coala_factors(alpha, N):
    W, X, _ = data(N=N, seed=6)
    A, B = output_factors(W, r_full(X, X), 5, alpha)
    A2, B2 = coala_factors(W, fold_r([X], dtype=F64), 5)
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=0, atol=1e-10)


@pytest.mark.parametrize("N", [200, 10])
def test_alpha_zero_is_coala_on_the_compressed_inputs(N):
    W, X, Xh = data(N=N, seed=7)
    A, B, S = output_factors(W, r_full(Xh, X), 5, 0.0, return_singular_values=True)
    A2, B2, S2 = coala_factors(W, fold_r([Xh], dtype=F64), 5, return_singular_values=True)
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S2)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("N", [200, 10])
def test_mu_is_the_objective_with_appended_rows(alpha, N):
    """mu folds sqrt(mu) [I | I] into R: the optimum of the augmented data, and
    output_error(mu) = direct objective + mu ||W - W'||^2."""
    W, X, Xh = data(N=N, seed=8)
    mu, n = 2.5, X.shape[1]
    R = r_full(Xh, X)
    A, B = output_factors(W, R, 5, alpha, mu)
    eye = math.sqrt(mu) * torch.eye(n, dtype=F64)
    Xa, Xha = torch.cat([X, eye]), torch.cat([Xh, eye])
    A_ref, B_ref = reference(W, Xa, Xha, 5, alpha)
    torch.testing.assert_close(A @ B, A_ref @ B_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(regularize_pair(R, n, mu).T @ regularize_pair(R, n, mu),
                               torch.cat([Xha, Xa], 1).T @ torch.cat([Xha, Xa], 1))
    assert output_error(W, A, B, R, alpha, mu) == pytest.approx(direct(W, X, Xh, A, B, alpha, mu), rel=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("N", [200, 10])
def test_tail_energy_is_the_exact_error_of_every_rank(alpha, N):
    """error(r) = sum_{i >= r} S_i^2 + a rank-independent floor (||R22' W^T||^2, plus
    the part of the target outside range(R11) when N < n)."""
    W, X, Xh = data(N=N, seed=9)
    R = r_full(Xh, X)
    _, S, _, _ = output_svd(W, R, alpha)
    tail = tail_energy(S)
    errors = [direct(W, X, Xh, *output_factors(W, R, r, alpha), alpha) for r in range(1, 17)]
    floor = errors[-1]
    if N >= 32:  # R22 is full: the floor is ||R22' W^T||^2, nothing else
        R22t = target_r(R, 16, alpha)[16:, 16:]
        assert floor == pytest.approx(float(torch.linalg.norm(R22t @ W.T) ** 2), rel=1e-10)
    for r, err in enumerate(errors, start=1):
        assert err == pytest.approx(float(tail[min(r, len(S))]) + floor, rel=1e-10, abs=1e-9 * errors[0])


# -- singular and ill-conditioned R11 ----------------------------------------------


def rank_deficient(kind, seed=10):
    W, X, Xh = data(N=10 if kind == "few_tokens" else 200, seed=seed)
    if kind == "duplicated":  # Xh of rank 14, exactly: a copied and a doubled feature
        Xh[:, 5] = Xh[:, 2]
        Xh[:, 9] = 2 * Xh[:, 1]
    return W, X, Xh


@pytest.mark.parametrize("kind", ["few_tokens", "duplicated"])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("rank", [3, 8])
def test_singular_r11_gives_the_optimum_closest_to_w(kind, alpha, rank):
    """Documented rule: exact optimum on range(Xh), and W' = W's own projection
    along directions Xh never spans (the minimiser closest to W)."""
    W, X, Xh = rank_deficient(kind)
    R = r_full(Xh, X)
    A, B = output_factors(W, R, rank, alpha)
    A_ref, B_ref = reference(W, X, Xh, rank, alpha)
    best = direct(W, X, Xh, A_ref, B_ref, alpha)
    assert direct(W, X, Xh, A, B, alpha) == pytest.approx(best, rel=1e-10)
    torch.testing.assert_close(A @ B, A_ref @ B_ref, rtol=0, atol=1e-8)
    # the mu -> 0+ limit of the regularised optimum: measured O(mu) (~9e-7 at mu = 1e-7)
    # down to mu ~ 1e-6, then R's rounding / mu takes over (1e-5 at mu = 1e-9)
    A_mu, B_mu = output_factors(W, R, rank, alpha, 1e-7)
    torch.testing.assert_close(A @ B, A_mu @ B_mu, rtol=0, atol=5e-6)
    # the minimum-norm least-squares B (same A) reaches the same objective, farther from W
    B_min = torch.linalg.pinv(Xh) @ ((alpha * X + (1 - alpha) * Xh) @ W.T @ A)
    assert direct(W, X, Xh, A, B_min.T, alpha) == pytest.approx(best, rel=1e-9)
    assert float(torch.linalg.norm(W - A @ B)) < float(torch.linalg.norm(W - A @ B_min.T)) - 1e-3


def test_rank_above_the_reachable_rank_fills_with_residual_directions():
    W, X, Xh = rank_deficient("few_tokens")  # N = 10 < rank = 14
    A, B = output_factors(W, r_full(Xh, X), 14, 1.0)
    torch.testing.assert_close(A.T @ A, torch.eye(14, dtype=F64))
    A_ref, B_ref = reference(W, X, Xh, 10, 1.0)
    assert direct(W, X, Xh, A, B, 1.0) == pytest.approx(direct(W, X, Xh, A_ref, B_ref, 1.0), abs=1e-9)
    assert float(torch.linalg.norm(W - A @ B)) < float(torch.linalg.norm(W - A_ref @ B_ref))


def test_zero_compressed_inputs_keep_w_projected():
    W, X, _ = data(seed=11)
    Xh = torch.zeros_like(X)
    A, B = output_factors(W, r_full(Xh, X), 4, 1.0)
    assert bool(torch.isfinite(A @ B).all())
    A2, B2 = coala_factors(W, torch.eye(16, dtype=F64), 4)  # plain SVD of W
    torch.testing.assert_close(A @ B, A2 @ B2)
    assert output_error(W, A, B, r_full(Xh, X), 1.0) == pytest.approx(float(torch.linalg.norm(X @ W.T) ** 2))


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_svd_path_equals_triangular_path_on_well_conditioned_r11(alpha, monkeypatch):
    W, X, Xh = data(seed=12)
    R = r_full(Xh, X)
    A, B = output_factors(W, R, 6, alpha)
    monkeypatch.setattr(objective, "_nonsingular", lambda R11, rtol, *safety: False)
    A2, B2 = output_factors(W, R, 6, alpha)
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=0, atol=1e-10)


def test_condition_estimate_routes_singular_and_regular_triangles():
    W, X, Xh = rank_deficient("duplicated")
    n = 16
    R11 = r_full(Xh, X)[:n, :n]
    assert not objective._nonsingular(R11, n * torch.finfo(F64).eps)
    assert not objective._nonsingular(R11.float(), n * torch.finfo(torch.float32).eps)
    _, X, Xh = data(seed=13)  # Xh well-conditioned
    R11 = r_full(Xh, X)[:n, :n]
    assert objective._nonsingular(R11, n * torch.finfo(F64).eps)
    assert objective._nonsingular(R11.float(), n * torch.finfo(torch.float32).eps)
    assert not objective._nonsingular(R11[:10], 1e-6)  # wide trapezoid


def shifted_pair(n, spectrum, seed):
    """X with a prescribed spectrum, Xh = X (I + 0.1 E): a drift inside X's own subspace,
    so Xh is as ill-conditioned as X."""
    X = spectrum_matrix(1024, n, spectrum, seed=seed)
    E = torch.randn(n, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) / math.sqrt(n)
    return X, X @ (torch.eye(n, dtype=F64) + 0.1 * E)


def aasvd32(W, X, Xh, rank, alpha):
    Z = torch.cat([Xh, X], dim=1).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            factors = aasvd_factors(W.float(), Z.T @ Z, rank, alpha)
        except torch.linalg.LinAlgError:
            factors = None
    return factors, any(issubclass(w.category, NumericalFallbackWarning) for w in caught)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_float32_holds_at_cond_1e6_where_the_float32_gram_baseline_falls_back(alpha):
    """Log spectrum, cond(X) = cond(Xh) ~ 1e6, n = 64. Measured: float32 COALA within
    ~2e-9 of the float64 optimum (R11 takes the SVD path); float32 AA-SVD needs damped
    Cholesky and is ~2.5e-5 above it."""
    n, r = 64, 16
    X, Xh = shifted_pair(n, log_spectrum(n, 1e6), seed=2)
    W = torch.randn(96, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    optimum = direct(W, X, Xh, *output_factors(W, r_full(Xh, X), r, alpha), alpha)
    R32 = r_full(Xh, X, torch.float32)
    assert not objective._nonsingular(R32[:n, :n], n * torch.finfo(torch.float32).eps)  # the SVD path
    A, B = output_factors(W.float(), R32, r, alpha)
    assert A.dtype == torch.float32
    coala = direct(W, X, Xh, A, B, alpha)
    assert coala <= optimum * (1 + 1e-7)
    factors, fell_back = aasvd32(W, X, Xh, r, alpha)
    assert fell_back
    assert factors is None or direct(W, X, Xh, *factors, alpha) > optimum * (1 + 5e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_float64_triangular_solve_where_r11s_svd_would_keep_every_direction(alpha, monkeypatch):
    """cond(R11) ~ 3e4 at n = 64 in float32: past the float32 solve's bound (1 / (10 n eps)
    ~ 1.3e4) but under the SVD's cutoff (1 / (n eps) ~ 1.3e5), where the range solve keeps
    every direction. The float64 triangular solve gives its answer (measured 1.5e-6 apart)
    at the float64 optimum (measured 1e-10 above it) without R11's SVD."""
    n, r = 64, 16
    X, Xh = shifted_pair(n, log_spectrum(n, 3e4), seed=2)
    W = torch.randn(96, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    optimum = direct(W, X, Xh, *output_factors(W, r_full(Xh, X), r, alpha), alpha)
    R32 = r_full(Xh, X, torch.float32)
    rtol = n * torch.finfo(torch.float32).eps
    assert not objective._nonsingular(R32[:n, :n], rtol)
    problem = objective.OutputProblem(R32, n, alpha)
    A, B = problem.factors(W.float(), r)
    assert problem.path() == "triangular in float64" and A.dtype == B.dtype == torch.float32
    assert direct(W, X, Xh, A, B, alpha) <= optimum * (1 + 1e-8)
    monkeypatch.setattr(objective, "_nonsingular", lambda R11, rtol, *safety: False)
    svd_path = objective.OutputProblem(R32, n, alpha)
    A2, B2 = svd_path.factors(W.float(), r)
    assert svd_path.path() == f"SVD of R11 (range {n} of {n})"
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=0, atol=2e-5 * float(torch.linalg.norm(A2 @ B2)))


def test_svd_path_stays_where_its_cutoff_drops_directions():
    n = 64
    X, Xh = shifted_pair(n, log_spectrum(n, 1e6), seed=2)
    problem = objective.OutputProblem(r_full(Xh, X, torch.float32), n, 0.5)
    assert problem.path() is None
    problem.factors(torch.randn(96, n), 16)
    path = problem.path()
    assert path.startswith("SVD of R11 (range ") and int(path.split()[4]) < n


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_float32_gram_baseline_loses_accuracy_with_outlier_features(alpha):
    """4 features at 1e3 over moderate ones (cond(Xh) ~ 1e4). Measured: float32 COALA
    ~6e-7 above the float64 optimum, float32 AA-SVD ~20% above."""
    n, r = 64, 16
    s = torch.logspace(0, -1, n, dtype=F64)
    s[:4] = 1e3
    X, Xh = shifted_pair(n, s, seed=3)
    W = torch.randn(96, n, generator=torch.Generator().manual_seed(4), dtype=F64)
    optimum = direct(W, X, Xh, *output_factors(W, r_full(Xh, X), r, alpha), alpha)
    coala = direct(W, X, Xh, *output_factors(W.float(), r_full(Xh, X, torch.float32), r, alpha), alpha)
    assert coala <= optimum * (1 + 1e-5)
    factors, _ = aasvd32(W, X, Xh, r, alpha)
    assert factors is None or direct(W, X, Xh, *factors, alpha) > optimum * 1.05


# -- validation --------------------------------------------------------------------


def test_bad_arguments_raise_usage_errors():
    W, X, Xh = data()
    R = r_full(Xh, X)
    cases = [
        (lambda: output_factors(W, R, 4, 1.5), "alpha"),
        (lambda: output_factors(W, R, 4, -0.1), "alpha"),
        (lambda: output_factors(W, R, 4, float("nan")), "alpha"),
        (lambda: output_factors(W, R, 4, True), "alpha"),
        (lambda: output_factors(W, R, 4, 0.5, -1.0), "mu"),
        (lambda: output_factors(W, R, 0, 0.5), "rank"),
        (lambda: output_factors(W, R, 17, 0.5), "rank"),
        (lambda: output_factors(W, R, 4, 0.5, rtol=2.0), "rtol"),
        (lambda: output_factors(W, R[:, :30], 4, 0.5), "R_full"),
        (lambda: output_factors(W, R.T.contiguous(), 4, 0.5), "R_full"),
        (lambda: output_svd(W[:, :15], R, 0.5), "R_full"),
        (lambda: split_r(R, 0), "n"),
        (lambda: target_r(R, 16, 2.0), "alpha"),
        (lambda: regularize_pair(R, 16, -1.0), "mu"),
        (lambda: output_error(W, torch.zeros(24, 3), torch.zeros(4, 16), R, 0.5), "A, B"),
        (lambda: output_factors(W, R.numpy(), 4, 0.5), "R_full"),
    ]
    for call, name in cases:
        with pytest.raises(UsageError, match=name):
            call()


def test_float32_inputs_give_float32_factors():
    W, X, Xh = data()
    A, B, S = output_factors(W.float(), r_full(Xh, X, torch.float32), 4, 0.5, return_singular_values=True)
    assert A.dtype == B.dtype == S.dtype == torch.float32
    A, B = output_factors(W.to(torch.bfloat16), r_full(Xh, X, torch.float32), 4, 0.5)
    assert A.dtype == torch.float32
