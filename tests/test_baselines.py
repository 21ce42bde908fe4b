"""Baselines: correct in easy cases, and the Gram path's failure where COALA holds."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from coala_stream.baselines import (
    NumericalFallbackWarning,
    aasvd_factors,
    asvd_factors,
    svd_factors,
    svdllm_factors,
)
from coala_stream.linalg import coala_factors, fold_r
from coala_stream.objective import output_factors

from .test_linalg import log_spectrum, objective, spectrum_matrix

F64 = torch.float64


def test_svd_factors_is_eckart_young():
    W = torch.randn(20, 12, dtype=F64)
    A, B = svd_factors(W, 4)
    S = torch.linalg.svdvals(W)
    assert float(torch.linalg.norm(W - A @ B) ** 2) == pytest.approx(float((S[4:] ** 2).sum()), rel=1e-10)


def test_svdllm_equals_coala_in_float64_on_well_conditioned_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 16, generator=g, dtype=F64)
    W = torch.randn(10, 16, generator=g, dtype=F64)
    A, B = svdllm_factors(W, X.T @ X, 5, dtype=F64)
    A2, B2 = coala_factors(W, fold_r([X], dtype=F64), 5)
    torch.testing.assert_close(A @ B, A2 @ B2)


def test_asvd_with_uniform_scale_is_plain_svd():
    W = torch.randn(14, 9, dtype=F64)
    A, B = asvd_factors(W, torch.full((9,), 3.0, dtype=F64), 4)
    A2, B2 = svd_factors(W, 4)
    torch.testing.assert_close(A @ B, A2 @ B2)


def test_asvd_survives_dead_features():
    W = torch.randn(8, 6, dtype=F64)
    scale = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 1.0], dtype=F64)
    A, B = asvd_factors(W, scale, 3)
    assert bool(torch.isfinite(A @ B).all())


def _fp32_gram_pipeline(X, W, rank):
    """Peers' recipe: Gram accumulated in float32, Cholesky and inverse in float32."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            A, B = svdllm_factors(W.float(), X.float().T @ X.float(), rank)
        except torch.linalg.LinAlgError:
            return None, caught
    return (A, B), caught


@pytest.mark.parametrize("cond", [1e5, 1e6, 1e7])
def test_gram_cholesky_fails_in_float32_where_coala_is_exact(cond):
    """Log-decaying spectrum: Cholesky of the float32 Gram matrix is not positive
    definite (needs damping or raises), while float32 COALA stays within 0.1%."""
    n, r = 64, 16
    X = spectrum_matrix(1024, n, log_spectrum(n, cond), seed=2)
    W = torch.randn(96, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    gram32 = X.float().T @ X.float()
    assert int(torch.linalg.cholesky_ex(gram32).info) != 0  # peers' plain Cholesky fails
    factors, caught = _fp32_gram_pipeline(X, W, r)
    assert factors is None or any(issubclass(w.category, NumericalFallbackWarning) for w in caught)
    optimum = objective(X, W, *coala_factors(W, fold_r([X], dtype=F64), r))
    assert objective(X, W, *coala_factors(W.float(), fold_r([X.float()]), r)) <= optimum * (1 + 1e-3)


@pytest.mark.parametrize("cond", [1e3, 1e4])
def test_gram_whitening_visibly_loses_accuracy_with_outlier_features(cond):
    """LLM-like inputs: a few massive features over moderate ones. Float32 Gram
    rounding (eps * s_max^2) swamps the moderate directions; QR does not."""
    n, r = 64, 16
    s = torch.logspace(0, -1, n, dtype=F64)
    s[:4] = cond
    X = spectrum_matrix(1024, n, s, seed=3)
    W = torch.randn(96, n, generator=torch.Generator().manual_seed(4), dtype=F64)
    optimum = objective(X, W, *coala_factors(W, fold_r([X], dtype=F64), r))
    coala32 = objective(X, W, *coala_factors(W.float(), fold_r([X.float()]), r))
    factors, _ = _fp32_gram_pipeline(X, W, r)
    assert coala32 <= optimum * (1 + 1e-3)
    assert factors is None or objective(X, W, *factors) > optimum * 1.01


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_aasvd_equals_the_gram_free_objective_in_float64_on_well_conditioned_data(alpha):
    g = torch.Generator().manual_seed(5)
    X = torch.randn(300, 16, generator=g, dtype=F64)
    Xh = X + 0.3 * torch.randn(300, 16, generator=g, dtype=F64)
    W = torch.randn(24, 16, generator=g, dtype=F64)
    Z = torch.cat([Xh, X], dim=1)
    A, B = aasvd_factors(W, Z.T @ Z, 5, alpha, dtype=F64)
    A2, B2 = output_factors(W, fold_r([Z], dtype=F64), 5, alpha)
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=0, atol=1e-10)


def test_aasvd_with_unshifted_inputs_is_svdllm():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(300, 16, generator=g, dtype=F64)
    W = torch.randn(10, 16, generator=g, dtype=F64)
    Z = torch.cat([X, X], dim=1)
    A, B = aasvd_factors(W, Z.T @ Z, 5, 1.0, dtype=F64)
    A2, B2 = svdllm_factors(W, X.T @ X, 5, dtype=F64)
    torch.testing.assert_close(A @ B, A2 @ B2)


def test_aasvd_damps_a_singular_gram_with_a_warning():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(8, 16, generator=g, dtype=F64)  # 8 tokens < 16 features: C is singular
    Z = torch.cat([X, X], dim=1)
    with pytest.warns(NumericalFallbackWarning):
        A, B = aasvd_factors(torch.randn(10, 16, generator=g), Z.T @ Z, 4)
    assert bool(torch.isfinite(A @ B).all())


def test_aasvd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gram"):
        aasvd_factors(torch.randn(5, 4), torch.eye(4), 2)
    with pytest.raises(ValueError, match="alpha"):
        aasvd_factors(torch.randn(5, 4), torch.eye(8), 2, 1.5)


def test_svdllm_rejects_wrong_gram_shape():
    with pytest.raises(ValueError, match="gram"):
        svdllm_factors(torch.randn(5, 4), torch.eye(3), 2)


def test_asvd_rejects_negative_scale():
    with pytest.raises(ValueError, match="abs_mean"):
        asvd_factors(torch.randn(5, 4), torch.tensor([1.0, -1.0, 1.0, 1.0]), 2)


def test_log_spectrum_helper_has_the_requested_condition_number():
    assert float(log_spectrum(10, 1e4)[0] / log_spectrum(10, 1e4)[-1]) == pytest.approx(1e4)
    assert math.isclose(float(torch.linalg.cond(spectrum_matrix(50, 10, log_spectrum(10, 1e3)))), 1e3, rel_tol=1e-6)
