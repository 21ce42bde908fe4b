"""The COALA math against float64 references: fold_r, merge_r, coala_factors."""

from __future__ import annotations

import math

import pytest
import torch

from coala_stream.errors import UsageError
from coala_stream.linalg import (
    _PANELED_MIN_COLUMNS,
    _canonical,
    _fold_under_r,
    coala_factors,
    fold_block,
    coala_svd,
    fold_r,
    merge_r,
    rank_for_ratio,
    regularize_r,
    tail_energy,
)

F64 = torch.float64


def spectrum_matrix(N, n, singular_values, seed=0, dtype=F64):
    """X = Q1 diag(s) Q2^T with prescribed singular values (N >= n)."""
    g = torch.Generator().manual_seed(seed)
    Q1, _ = torch.linalg.qr(torch.randn(N, len(singular_values), generator=g, dtype=dtype))
    Q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    return (Q1 * singular_values.to(dtype)) @ Q2[:, : len(singular_values)].T


def log_spectrum(n, cond):
    return torch.logspace(0, -math.log10(cond), n, dtype=F64)


def objective(X, W, A, B, mu=0.0):
    """||X (W - AB)^T||_F^2 + mu ||W - AB||_F^2 in float64."""
    D = W.to(F64) - A.to(F64) @ B.to(F64)
    return float(torch.linalg.norm(X.to(F64) @ D.T) ** 2 + mu * torch.linalg.norm(D) ** 2)


def gram_error(R, X):
    G = X.to(F64).T @ X.to(F64)
    return float(torch.linalg.norm(R.to(F64).T @ R.to(F64) - G) / torch.linalg.norm(G))


# -- fold_r -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_streamed_fold_equals_one_shot_qr_for_random_splits(seed):
    g = torch.Generator().manual_seed(seed)
    N, n = 700, 48
    X = torch.randn(N, n, generator=g, dtype=F64) * torch.logspace(0, 3, n, dtype=F64)
    cuts = sorted(torch.randint(0, N, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist())
    blocks = [X[a:b] for a, b in zip([0] + cuts, cuts + [N])]  # zero-row blocks included
    R = fold_r(blocks, dtype=F64)
    R_ref = torch.linalg.qr(X, mode="r").R
    R_ref = R_ref * torch.sign(torch.diagonal(R_ref)).unsqueeze(1)
    assert R.shape == (n, n)
    assert torch.equal(R, torch.triu(R))
    assert bool((torch.diagonal(R) >= 0).all())
    torch.testing.assert_close(R, R_ref, rtol=1e-10, atol=1e-10 * float(R_ref.abs().max()))
    assert gram_error(R, X) < 1e-13


def test_fold_continues_from_previous_r():
    X = torch.randn(300, 20, dtype=F64)
    R_all = fold_r([X], dtype=F64)
    R_two = fold_r([X[200:]], fold_r([X[:200]], dtype=F64), dtype=F64)
    torch.testing.assert_close(R_two, R_all)


def test_fewer_tokens_than_features_gives_trapezoidal_r():
    X = torch.randn(7, 30, dtype=F64)
    R = fold_r([X[:3], X[3:]], dtype=F64)
    assert R.shape == (7, 30)
    assert torch.equal(R, torch.triu(R))
    assert gram_error(R, X) < 1e-13


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_16bit_blocks_give_the_r_of_their_float32_upcast(half):
    X = torch.randn(257, 40).to(half)
    R_half = fold_r(X.split(64), dtype=torch.float32)
    R_up = fold_r(X.float().split(64), dtype=torch.float32)
    assert torch.equal(R_half, R_up)
    assert R_half.dtype == torch.float32


def test_float32_fold_matches_float64_reference_on_ill_conditioned_input():
    X = spectrum_matrix(2000, 64, log_spectrum(64, 1e6)).float()
    R = fold_r(X.split(300), dtype=torch.float32)
    assert gram_error(R, X) < 1e-6  # backward stable: error ~ eps, not eps * cond^2


# -- the panel fold under R (CPU fold_block for n >= _PANELED_MIN_COLUMNS) -------


def stacked_reference(R, X):
    """Canonical R of [R; X] from a float64 Householder QR of the stack."""
    S = X.to(F64) if R is None else torch.cat([R.to(F64), X.to(F64)])
    R_ref = torch.linalg.qr(S, mode="r").R
    return _canonical(R_ref), S


def old_fold(R, X):
    """fold_block before the panel path: one QR of the stack, in X's dtype."""
    return _canonical(torch.linalg.qr(X if R is None else torch.cat([R, X]), mode="r").R)


def previous_r(k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return old_fold(None, torch.randn(max(k, 1) + 3, n, generator=g, dtype=F64))[:k].to(dtype)


TOL = {torch.float32: 2e-6, F64: 1e-13}

# (n, t, k, panel): t < n, t = n, t >> n under an existing R (k = n); R = None;
# a trapezoidal R (k < n, k + t >= n); n not a multiple of the panel; panel >= n.
PANEL_CASES = [
    (40, 10, 40, 8),
    (40, 40, 40, 8),
    (40, 400, 40, 8),
    (45, 300, None, 8),
    (45, 45, None, 16),
    (50, 20, 35, 16),
    (67, 130, 67, 16),
    (30, 50, 30, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n, t, k, panel", PANEL_CASES)
@pytest.mark.parametrize("blocks", [1, 2, None])  # outer block = panel (one level), 2 panels, default
def test_panel_fold_matches_float64_reference(n, t, k, panel, dtype, blocks):
    g = torch.Generator().manual_seed(n + t)
    X = (torch.randn(t, n, generator=g, dtype=F64) * torch.logspace(0, 2, n, dtype=F64)).to(dtype)
    R = None if k is None else previous_r(k, n, dtype, seed=k)
    X_before = X.clone()
    R_new = _canonical(_fold_under_r(R, X, panel) if blocks is None
                       else _fold_under_r(R, X, panel, blocks * panel))
    R_ref, S = stacked_reference(R, X)
    assert torch.equal(X, X_before)  # the caller's block is not overwritten
    assert R_new.shape == (n, n) and R_new.dtype == dtype
    assert torch.equal(R_new, torch.triu(R_new))
    assert bool((torch.diagonal(R_new) >= 0).all())
    assert gram_error(R_new, S) < TOL[dtype]
    # Same canonical R as the old path, to rounding (R is unique for full-rank [R; X]).
    scale = float(R_ref.abs().max())
    torch.testing.assert_close(R_new.to(F64), R_ref, rtol=0, atol=50 * TOL[dtype] * scale)
    torch.testing.assert_close(R_new, old_fold(R, X), rtol=0, atol=50 * TOL[dtype] * scale)


@pytest.mark.parametrize("dtype, cond, tol", [(F64, 1e6, 1e-13), (torch.float32, 1e3, 2e-6), (torch.float32, 1e6, 2e-6)])
def test_panel_fold_is_backward_stable_on_ill_conditioned_input(dtype, cond, tol):
    n = 72
    X = spectrum_matrix(900, n, log_spectrum(n, cond), seed=4)
    R = None
    for block in X.to(dtype).split(300):  # R = None first, then folds under an existing R
        R = _canonical(_fold_under_r(R, block, 16))
    assert gram_error(R, X.to(dtype)) < tol  # backward stable: error ~ eps, whatever cond(X)


@pytest.mark.parametrize("cond", [1e3, 1e5, 1e7])
def test_float32_panel_fold_keeps_coala_within_0p1_percent_of_float64_optimum(cond):
    """The accuracy that matters downstream: float32 R from the panel path, then COALA."""
    n, r = 64, 16
    X = spectrum_matrix(1024, n, log_spectrum(n, cond), seed=int(math.log10(cond)))
    W = torch.randn(96, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    A64, B64 = coala_factors(W, fold_r([X], dtype=F64), r)
    R32 = None
    for block in X.float().split(200):
        R32 = _canonical(_fold_under_r(R32, block, 16))
    A32, B32 = coala_factors(W.float(), R32, r)
    assert objective(X, W, A32, B32) <= objective(X, W, A64, B64) * (1 + 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_panel_fold_handles_rank_deficient_blocks(dtype):
    g = torch.Generator().manual_seed(8)
    n = 50
    X = torch.randn(200, 6, generator=g, dtype=F64) @ torch.randn(6, n, generator=g, dtype=F64)
    X[:, [3, 17, 40]] = 0.0  # exactly zero columns: reflectors with tau = 0
    X[:, 21] = X[:, 20]  # a repeated column
    X = X.to(dtype)
    R = _canonical(_fold_under_r(None, X, 16))
    assert bool(torch.isfinite(R).all())
    assert gram_error(R, X) < TOL[dtype]
    zeros = torch.zeros(120, n, dtype=dtype)  # an all-zero block leaves R unchanged
    torch.testing.assert_close(_canonical(_fold_under_r(R, zeros, 16)), R, rtol=0, atol=0)
    R_lowrank = previous_r(n, n, dtype, seed=1)[:4]  # trapezoidal R of rank 4, then X
    R2 = _canonical(_fold_under_r(R_lowrank, X, 16))
    assert gram_error(R2, torch.cat([R_lowrank, X])) < TOL[dtype]


def test_fold_block_takes_the_panel_path_on_cpu_for_wide_inputs():
    n = _PANELED_MIN_COLUMNS + 5
    g = torch.Generator().manual_seed(9)
    X = torch.randn(2 * n + 7, n, generator=g, dtype=F64)
    R = fold_block(None, X[: n + 3])
    R = fold_block(R, X[n + 3 :])
    torch.testing.assert_close(fold_block(previous_r(n, n, F64, 2), X), _canonical(_fold_under_r(previous_r(n, n, F64, 2), X)),
                               rtol=0, atol=0)
    assert R.shape == (n, n) and bool((torch.diagonal(R) >= 0).all())
    assert gram_error(R, X) < 1e-13
    few = fold_block(None, X[:10])  # fewer rows than columns: the plain QR, trapezoidal R
    assert few.shape == (10, n) and gram_error(few, X[:10]) < 1e-13
    merged = merge_r(fold_r([X[:n]], dtype=F64), fold_r([X[n:]], dtype=F64))
    assert gram_error(merged, X) < 1e-13


def test_fold_block_folds_long_blocks_in_row_pieces(monkeypatch):
    import coala_stream.linalg as linalg

    n = _PANELED_MIN_COLUMNS + 1
    monkeypatch.setattr(linalg, "_FOLD_ROWS", 10)  # pieces of >= n rows: 3 here
    X = torch.randn(3 * n + 50, n, generator=torch.Generator().manual_seed(10), dtype=F64)
    R0 = previous_r(n // 2, n, F64, 4)  # trapezoidal R: the first piece pads it
    R = fold_block(R0, X)
    R_ref, S = stacked_reference(R0, X)
    assert R.shape == (n, n) and gram_error(R, S) < 1e-13
    torch.testing.assert_close(R, R_ref, rtol=0, atol=1e-12 * float(R_ref.abs().max()))
    assert gram_error(fold_block(None, X), X) < 1e-13


def test_fold_r_streams_float32_through_the_panel_path():
    n = _PANELED_MIN_COLUMNS
    X = spectrum_matrix(3 * n, n, log_spectrum(n, 1e4), seed=3).float()
    R = fold_r(X.split(n // 2 + 1), dtype=torch.float32)
    assert R.shape == (n, n)
    assert gram_error(R, X) < 2e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fold_block_on_cuda_matches_cpu():
    n = _PANELED_MIN_COLUMNS + 5
    X = torch.randn(2 * n, n, dtype=F64)
    R = previous_r(n, n, F64, 3)
    torch.testing.assert_close(fold_block(R.cuda(), X.cuda()).cpu(), fold_block(R, X), rtol=1e-12, atol=1e-12)


# -- merge_r ------------------------------------------------------------------


def test_merge_is_associative_and_equals_the_fold_of_everything():
    parts = [torch.randn(k, 25, dtype=F64) for k in (40, 90, 13)]
    R1, R2, R3 = (fold_r([p], dtype=F64) for p in parts)
    left = merge_r(merge_r(R1, R2), R3)
    right = merge_r(R1, merge_r(R2, R3))
    whole = fold_r([torch.cat(parts)], dtype=F64)
    torch.testing.assert_close(left, right, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(left, whole, rtol=1e-12, atol=1e-12)


def test_merge_of_short_partials_is_trapezoidal():
    R1 = fold_r([torch.randn(3, 10, dtype=F64)], dtype=F64)
    R2 = fold_r([torch.randn(4, 10, dtype=F64)], dtype=F64)
    assert merge_r(R1, R2).shape == (7, 10)


# -- coala_factors ------------------------------------------------------------


def test_error_equals_tail_of_singular_values_and_beats_random_alternatives():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 32, generator=g, dtype=F64) * torch.logspace(0, 2, 32, dtype=F64)
    W = torch.randn(24, 32, generator=g, dtype=F64)
    R = fold_r([X], dtype=F64)
    for rank in (1, 5, 12, 24):
        A, B, S = coala_factors(W, R, rank, return_singular_values=True)
        best = objective(X, W, A, B)
        assert best == pytest.approx(float(tail_energy(S)[rank]), rel=1e-9, abs=1e-9)
        for _ in range(20):  # random rank-r candidates and perturbations of the optimum
            A2 = A + 1e-3 * torch.randn(A.shape, generator=g, dtype=F64)
            B2 = B + 1e-3 * torch.randn(B.shape, generator=g, dtype=F64)
            assert objective(X, W, A2, B2) >= best * (1 - 1e-12)
            A3, B3 = torch.randn(A.shape, generator=g, dtype=F64), torch.randn(B.shape, generator=g, dtype=F64)
            assert objective(X, W, A3, B3) >= best


def test_factors_shapes_and_orthonormal_a():
    W = torch.randn(30, 20, dtype=F64)
    R = fold_r([torch.randn(100, 20, dtype=F64)], dtype=F64)
    A, B = coala_factors(W, R, 7)
    assert A.shape == (30, 7) and B.shape == (7, 20)
    torch.testing.assert_close(A.T @ A, torch.eye(7, dtype=F64))


@pytest.mark.parametrize("cond", [1e1, 1e3, 1e5, 1e7])
def test_float32_coala_within_0p1_percent_of_float64_optimum(cond):
    n, r = 64, 16
    X = spectrum_matrix(1024, n, log_spectrum(n, cond), seed=int(math.log10(cond)))
    W = torch.randn(96, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    A64, B64 = coala_factors(W, fold_r([X], dtype=F64), r)
    optimum = objective(X, W, A64, B64)
    R32 = fold_r(X.float().split(200), dtype=torch.float32)
    A32, B32 = coala_factors(W.float(), R32, r)
    assert objective(X, W, A32, B32) <= optimum * (1 + 1e-3)


def test_rank_deficient_r_fewer_tokens_than_features():
    g = torch.Generator().manual_seed(5)
    N, n, m = 6, 40, 30
    X = torch.randn(N, n, generator=g, dtype=F64)
    W = torch.randn(m, n, generator=g, dtype=F64)
    R = fold_r([X], dtype=F64)
    assert R.shape == (N, n)
    # Reference: left singular vectors of W X^T (X = Q R, Q with orthonormal columns).
    U, S, _ = torch.linalg.svd(W @ X.T, full_matrices=False)
    for rank in (3, 6, 10):
        A, B = coala_factors(W, R, rank)
        expected = float((S[rank:] ** 2).sum()) if rank < len(S) else 0.0
        assert objective(X, W, A, B) == pytest.approx(expected, abs=1e-9 * float((S**2).sum()))
        torch.testing.assert_close(A.T @ A, torch.eye(rank, dtype=F64))


def test_rank_beyond_data_rank_keeps_weights_close():
    """With r > rank(X) the extra columns follow W itself, not arbitrary directions."""
    g = torch.Generator().manual_seed(6)
    X = torch.randn(4, 20, generator=g, dtype=F64)
    W = torch.randn(20, 20, generator=g, dtype=F64)
    R = fold_r([X], dtype=F64)
    A, B = coala_factors(W, R, 20)
    torch.testing.assert_close(A @ B, W)


def test_mu_equals_augmenting_x_with_scaled_identity():
    g = torch.Generator().manual_seed(7)
    N, n, m, rank, mu = 10, 24, 16, 5, 0.37
    X = torch.randn(N, n, generator=g, dtype=F64)
    W = torch.randn(m, n, generator=g, dtype=F64)
    A, B, S = coala_factors(W, fold_r([X], dtype=F64), rank, mu=mu, return_singular_values=True)
    X_aug = torch.cat([X, math.sqrt(mu) * torch.eye(n, dtype=F64)])
    A2, B2 = coala_factors(W, fold_r([X_aug], dtype=F64), rank)
    torch.testing.assert_close(A @ B, A2 @ B2)
    assert objective(X, W, A, B, mu) == pytest.approx(float(tail_energy(S)[rank]), rel=1e-10)
    torch.testing.assert_close(regularize_r(fold_r([X], dtype=F64), mu), fold_r([X_aug], dtype=F64))


def test_mu_zero_leaves_r_unchanged():
    R = fold_r([torch.randn(50, 8, dtype=F64)], dtype=F64)
    assert regularize_r(R, 0.0) is R


def test_total_energy_is_weighted_norm_of_w():
    X = torch.randn(90, 16, dtype=F64)
    W = torch.randn(12, 16, dtype=F64)
    _, S = coala_svd(W, fold_r([X], dtype=F64))
    assert float(tail_energy(S)[0]) == pytest.approx(float(torch.linalg.norm(X @ W.T) ** 2), rel=1e-12)


def test_rank_for_ratio_follows_svd_llm_convention():
    assert rank_for_ratio(576, 576, 0.2) == math.floor(0.8 * 576 * 576 / 1152)
    assert rank_for_ratio(1536, 576, 0.4) == math.floor(0.6 * 1536 * 576 / (1536 + 576))
    r = rank_for_ratio(1536, 576, 0.2)
    assert r * (1536 + 576) <= 0.8 * 1536 * 576


# -- bad input ----------------------------------------------------------------

GOOD_R = torch.eye(4)


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda: fold_r([torch.randn(3)]), "blocks[0]"),
        (lambda: fold_r([torch.randn(3, 4), torch.randn(3, 5)]), "blocks[1]"),
        (lambda: fold_r([torch.randint(0, 3, (3, 4))]), "blocks[0]"),
        (lambda: fold_r([torch.tensor([[1.0, float("nan")]])]), "NaN"),
        (lambda: fold_r([torch.tensor([[1.0, float("inf")]])]), "blocks[0]"),
        (lambda: fold_r([torch.randn(3, 4)], dtype=torch.float16), "dtype"),
        (lambda: fold_r([]), "blocks"),
        (lambda: fold_r([torch.randn(3, 5)], R=GOOD_R), "blocks[0]"),
        (lambda: fold_r([torch.randn(3, 4)], R=torch.randn(4)), "R"),
        (lambda: merge_r(GOOD_R, torch.eye(5)), "R2"),
        (lambda: coala_factors(torch.randn(6, 4), GOOD_R, 5), "rank"),
        (lambda: coala_factors(torch.randn(6, 4), GOOD_R, 0), "rank"),
        (lambda: coala_factors(torch.randn(6, 4), GOOD_R, 2.0), "rank"),
        (lambda: coala_factors(torch.randn(6, 5), GOOD_R, 2), "R"),
        (lambda: coala_factors(torch.full((6, 4), float("nan")), GOOD_R, 2), "W"),
        (lambda: coala_factors(torch.randn(6, 4), GOOD_R, 2, mu=-1.0), "mu"),
        (lambda: coala_factors(torch.randn(6, 4), GOOD_R, 2, mu=float("nan")), "mu"),
        (lambda: rank_for_ratio(10, 10, 1.0), "ratio"),
        (lambda: rank_for_ratio(10, 10, 0.0), "ratio"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, word):
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_balance_factors_keeps_the_product_and_splits_the_scale(dtype):
    from coala_stream.linalg import balance_factors

    g = torch.Generator().manual_seed(3)
    W = torch.randn(48, 40, generator=g, dtype=torch.float64)
    X = torch.randn(100, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 40, dtype=torch.float64)
    A, B = coala_factors(W.to(dtype), fold_r([X], dtype=dtype), 8)
    A2, B2 = balance_factors(A, B)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert ((A2 @ B2 - A @ B).norm() / (A @ B).norm()).item() < tol
    # both sides carry sqrt(S): A2^T A2 = B2 B2^T = diag(S)
    S = torch.linalg.svdvals((A @ B).double())[:8]
    torch.testing.assert_close((A2.T @ A2).double(), torch.diag(S), rtol=tol * 10, atol=tol * 10 * S[0].item())
    torch.testing.assert_close((B2 @ B2.T).double(), torch.diag(S), rtol=tol * 10, atol=tol * 10 * S[0].item())


def test_fold_and_merge_refuse_a_factor_that_is_not_triangular():
    """The CPU fold reads only R's upper triangle: a full matrix was folded wrongly in silence."""
    from coala_stream.linalg import merge_r

    full = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    R = fold_r([torch.randn(20, 6, generator=torch.Generator().manual_seed(2))])
    with pytest.raises(UsageError, match=r"R: expected an upper triangular .* entry \(1, 0\)"):
        fold_r([torch.randn(8, 6)], R=full)
    with pytest.raises(UsageError, match="R2: expected an upper triangular"):
        merge_r(R, full)
    merge_r(R, R)  # a real factor is fine


def test_residual_directions_are_orthogonal_to_A_for_a_rank_deficient_W():
    from coala_stream.linalg import residual_directions

    g = torch.Generator().manual_seed(3)
    W = (torch.randn(12, 2, generator=g, dtype=torch.float64)
         @ torch.randn(2, 10, generator=g, dtype=torch.float64))  # rank 2
    A, B = coala_factors(W, fold_r([torch.randn(40, 10, generator=g, dtype=torch.float64)],
                                   dtype=torch.float64), 6)
    assert torch.allclose(A.T @ A, torch.eye(6, dtype=torch.float64), atol=1e-12)
    extra = residual_directions(W, A[:, :2], 4)
    assert torch.allclose(A[:, :2].T @ extra, torch.zeros(2, 4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(extra.T @ extra, torch.eye(4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
def test_svd_falls_back_when_lapack_does_not_converge(shape, monkeypatch):
    """gesdd stopped a 1.5B solve with "failed to converge" after 21 minutes; the fallback
    (the SVD of the QR's triangle, in float64) gives the same singular triplets."""
    from coala_stream import linalg

    g = torch.Generator().manual_seed(3)
    U0, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), dtype=torch.float64, generator=g))
    V0, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), dtype=torch.float64, generator=g))
    S0 = torch.logspace(0, -12, min(shape), dtype=torch.float64)  # ill-conditioned, tiny tail
    S0[5:8] = S0[5]  # repeated singular values
    M = ((U0 * S0) @ V0.T).float()
    assert torch.equal(linalg.svd(M)[1], torch.linalg.svd(M, full_matrices=False)[1])
    real, calls = torch.linalg.svd, []

    def failing(A, full_matrices=True, **kw):
        calls.append(A.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(A, full_matrices=full_matrices, **kw)

    monkeypatch.setattr(torch.linalg, "svd", failing)
    U, S, Vh = linalg.svd(M)
    assert calls == [torch.float32, torch.float64]
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert U.shape == (shape[0], min(shape)) and Vh.shape == (min(shape), shape[1])
    ref = torch.linalg.svd(M.double(), full_matrices=False)
    torch.testing.assert_close(S.double(), ref[1], atol=1e-6, rtol=0)
    torch.testing.assert_close((U * S) @ Vh, M, atol=1e-6, rtol=0)
    eye = torch.eye(min(shape))
    torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-5, rtol=0)
    # the leading, well-separated directions agree with the float64 reference up to sign
    top = (U[:, :4].double().T @ ref[0][:, :4]).diagonal().abs()
    torch.testing.assert_close(top, torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
