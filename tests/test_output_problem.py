"""`objective.OutputProblem` (issue 25): the output objective prepared once per input and
reused by every layer that reads it gives what the one-layer functions give, the error
stays exact, and the per-input work (R11's conditioning, its SVD) is done once."""

from __future__ import annotations

import pytest
import torch

from coala_stream import objective
from coala_stream.errors import UsageError
from coala_stream.objective import (OutputProblem, output_factors, output_svd,
                                    relative_output_error)
from coala_stream.solve import SolveConfig
from coala_stream.solve.layer import solve_layer

from coala_stream.linalg import fold_r

from .test_objective import data, direct, r_full

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F64 = torch.float64


@pytest.mark.parametrize("N", [200, 10])  # well-conditioned R11; fewer tokens than features
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_one_problem_for_three_layers_equals_three_separate_calls(N, mu):
    _, X, Xh = data(N=N)
    R = r_full(Xh, X, torch.float32)
    problem = OutputProblem(R, 16, 0.5, mu)
    for seed, m in enumerate((24, 8, 8)):  # q, k, v: one input, three weights
        W = torch.randn(m, 16, generator=torch.Generator().manual_seed(seed))
        A, B, S = problem.factors(W, 4, return_singular_values=True)
        A1, B1, S1 = output_factors(W, R, 4, 0.5, mu, return_singular_values=True)
        assert torch.equal(A, A1) and torch.equal(B, B1) and torch.equal(S, S1)
        U, S2, V = problem.svd(W)
        U1, S3, V1, _ = output_svd(W, R, 0.5, mu)
        assert torch.equal(U, U1) and torch.equal(S2, S3) and torch.equal(V, V1)
        assert problem.relative_error(W, A, B) == pytest.approx(
            relative_output_error(W, A, B, R, 0.5, mu), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_error_equals_the_float64_reference_from_the_data(alpha):
    W, X, Xh = data(N=200)
    mu = 0.3
    A, B = output_factors(W, r_full(Xh, X), 5, alpha, mu)
    problem = OutputProblem(r_full(Xh, X), 16, alpha, mu)
    err, total = problem.error(W, A, B)
    T = alpha * X + (1 - alpha) * Xh
    ref_total = float(torch.linalg.norm(T @ W.T) ** 2 + mu * torch.linalg.norm(W) ** 2)
    assert err == pytest.approx(direct(W, X, Xh, A, B, alpha, mu), rel=1e-10)
    assert total == pytest.approx(ref_total, rel=1e-10)


@pytest.mark.parametrize("N", [200, 10])
def test_conditioning_and_r11_svd_are_computed_once_per_input(N, monkeypatch):
    calls = {"nonsingular": 0, "svd": 0}
    real_ns, real_svd = objective._nonsingular, torch.linalg.svd

    def ns(*a, **k):
        calls["nonsingular"] += 1
        return real_ns(*a, **k)

    def svd(M, *a, **k):
        calls["svd"] += M.shape == (min(N, 16), 16)  # R11's (the layers' W R12'^T are m x k1)
        return real_svd(M, *a, **k)

    monkeypatch.setattr(objective, "_nonsingular", ns)
    monkeypatch.setattr(torch.linalg, "svd", svd)
    _, X, Xh = data(N=N)
    problem = OutputProblem(r_full(Xh, X, torch.float32), 16, 0.5)
    for m in (24, 8, 8):
        problem.factors(torch.randn(m, 16), 4)
    assert calls["nonsingular"] == 1
    assert calls["svd"] == (0 if N == 200 else 1)


def test_checks_stay_per_call():
    _, X, Xh = data()
    problem = OutputProblem(r_full(Xh, X), 16, 0.5)
    with pytest.raises(UsageError, match="W: holds NaN"):
        problem.factors(torch.full((4, 16), float("nan"), dtype=F64), 2)
    with pytest.raises(UsageError, match="W: expected 16 columns"):
        problem.svd(torch.randn(4, 15, dtype=F64))
    with pytest.raises(UsageError, match="rank"):
        problem.factors(torch.randn(4, 16, dtype=F64), 5)
    with pytest.raises(UsageError, match="A, B"):
        problem.error(torch.randn(4, 16, dtype=F64), torch.randn(4, 2, dtype=F64),
                      torch.randn(3, 16, dtype=F64))
    with pytest.raises(UsageError, match="upper-trapezoidal"):
        OutputProblem(torch.ones(32, 32), 16, 0.5)


def test_solve_layer_shares_the_problem_and_can_skip_the_error():
    _, X, Xh = data(N=200)

    class Reduced:
        R = r_full(Xh, X, torch.float32)

    config = SolveConfig(out="-", objective="output", alpha=0.5, mu=0.01, ratio=0.2)
    problems: dict = {}
    W = torch.randn(24, 16)
    shared = solve_layer(W, Reduced, 4, config, problems=problems)
    alone = solve_layer(W, Reduced, 4, config)
    quiet = solve_layer(W, Reduced, 4, config, problems=problems, with_error=False)
    assert len(problems) == 1
    assert torch.equal(shared["A"], alone["A"]) and torch.equal(shared["B"], alone["B"])
    assert torch.equal(quiet["B"], alone["B"]) and quiet["rel_error"] is None
    assert shared["rel_error"] == alone["rel_error"] > 0


# -- the narrow pair [Xh | X W_g^T] (issue 25) ---------------------------------------------

def _narrow_case(N=200, n=16, outputs=(5, 3), seed=0, conditioning=None):
    """W_g (sum(outputs) < n rows) and the factors of the wide and the narrow pair."""
    g = torch.Generator().manual_seed(seed)
    _, X, Xh = data(n=n, N=N, seed=seed)
    if conditioning == "ill":  # columns scaled over 1e6: cond(Xh) ~ 1e6 (1e12 for a Gram)
        scale = torch.logspace(0, -6, n, dtype=F64)
        X, Xh = X * scale, Xh * scale
    elif conditioning == "deficient":  # Xh's last 4 features copies of the first 4
        Xh = Xh.clone()
        Xh[:, -4:] = Xh[:, :4]
    Wg = torch.randn(sum(outputs), n, generator=g, dtype=F64)
    wide = r_full(Xh, X)
    narrow = fold_r([torch.cat([Xh, X @ Wg.T], dim=1)], dtype=F64)
    return X, Xh, Wg, wide, narrow


def _consumers(Wg, outputs):
    start = 0
    for m in outputs:
        yield Wg[start:start + m], slice(start, start + m)
        start += m


@pytest.mark.parametrize("conditioning", [None, "ill", "deficient"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mu", [0.0, 0.25])
def test_narrow_pair_solves_the_same_problem_as_the_wide_one(conditioning, alpha, mu):
    """Same optimum and the same exact error, checked against the objective computed from the
    data in float64; the fold is n + m columns wide instead of 2n."""
    outputs = (5, 3)
    X, Xh, Wg, wide, narrow = _narrow_case(outputs=outputs, conditioning=conditioning)
    assert narrow.shape[1] == 16 + 8 < wide.shape[1] == 32
    pw = OutputProblem(wide, 16, alpha, mu)
    pn = OutputProblem(narrow, 16, alpha, mu, outputs=outputs)
    for W, cols in _consumers(Wg, outputs):
        for rank in (1, 3):
            A1, B1 = pw.factors(W, rank)
            A2, B2 = pn.factors(W, rank, cols=cols)
            scale = float(torch.linalg.norm(W))
            assert float(torch.linalg.norm(A1 @ B1 - A2 @ B2)) <= 1e-8 * scale
            err, total = pn.error(W, A2, B2, cols)
            want = direct(W, X, Xh, A2, B2, alpha, mu)
            assert err == pytest.approx(want, rel=1e-9, abs=1e-12 * total)
            assert (err, total) == pytest.approx(pw.error(W, A2, B2), rel=1e-9)
        S_w, S_n = pw.svd(W)[1], pn.svd(W, cols)[1]
        assert torch.allclose(S_w, S_n, rtol=1e-8, atol=1e-10 * float(S_w[0]))


@pytest.mark.parametrize("conditioning", [None, "ill"])
def test_narrow_pair_in_float32_loses_what_the_wide_pair_loses(conditioning):
    """In float32 (cond(Xh) ~ 1e6 for "ill") the narrow pair's optimum is as far from the
    float64 one as the wide pair's (0.7 % for "ill", 1e-12 otherwise): nothing squared."""
    outputs = (6,)
    X, Xh, Wg, wide, narrow = _narrow_case(outputs=outputs, conditioning=conditioning)
    W, cols = next(_consumers(Wg, outputs))
    best = direct(W, X, Xh, *OutputProblem(narrow, 16, 0.5, outputs=outputs).factors(
        W, 3, cols=cols), 0.5)
    got = direct(W, X, Xh, *OutputProblem(narrow.float(), 16, 0.5, outputs=outputs).factors(
        W.float(), 3, cols=cols), 0.5)
    ref = direct(W, X, Xh, *OutputProblem(wide.float(), 16, 0.5).factors(W.float(), 3), 0.5)
    assert best <= got <= best * 1.01
    assert got == pytest.approx(ref, rel=1e-6)


def test_narrow_pair_in_the_float64_band_keeps_the_svd_paths_answer(monkeypatch):
    """cond(R11) ~ 1.2e5 at n = 16 in float32: past the float32 solve's bound, inside the SVD's
    keep-all range. The float64 triangular solve of the narrow pair lands on the float64
    optimum (measured 4e-12 above it) and on the SVD path's factors."""
    from coala_stream import objective

    g = torch.Generator().manual_seed(0)
    _, X, Xh = data(n=16, N=200, seed=0)
    scale = torch.logspace(0, -5, 16, dtype=F64)
    X, Xh = X * scale, Xh * scale
    W = torch.randn(6, 16, generator=g, dtype=F64)
    narrow = fold_r([torch.cat([Xh, X @ W.T], dim=1)], dtype=F64)
    cols = slice(0, 6)
    best = direct(W, X, Xh, *OutputProblem(narrow, 16, 0.5, outputs=(6,)).factors(
        W, 3, cols=cols), 0.5)
    problem = OutputProblem(narrow.float(), 16, 0.5, outputs=(6,))
    A, B = problem.factors(W.float(), 3, cols=cols)
    assert problem.path() == "triangular in float64"
    assert direct(W, X, Xh, A, B, 0.5) <= best * (1 + 1e-8)
    monkeypatch.setattr(objective, "_nonsingular", lambda R11, rtol, *safety: False)
    svd_path = OutputProblem(narrow.float(), 16, 0.5, outputs=(6,))
    A2, B2 = svd_path.factors(W.float(), 3, cols=cols)
    assert svd_path.path().startswith("SVD of R11")
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=0, atol=1e-5 * float(torch.linalg.norm(A2 @ B2)))


def test_narrow_pair_solve_layer_and_aasvd_agree_with_the_wide_pair():
    """Through solve's own layer code (coala, and aasvd from the narrow Gram matrix)."""
    outputs = (5, 3)
    X, Xh, Wg, wide, narrow = _narrow_case(outputs=outputs)

    class Reduced:  # what solve_layer reads of a ReducedInput
        def __init__(self, R, rows):
            self.R, self.gram, self.abs_sum, self.tokens = R, (rows.T @ rows).float(), None, 200

    rw = Reduced(wide, torch.cat([Xh, X], dim=1))
    rn = Reduced(narrow, torch.cat([Xh, X @ Wg.T], dim=1))
    for method in ("coala", "aasvd"):
        cfg = SolveConfig(out="-", ratio=0.3, method=method, objective="output", alpha=0.5, mu=0.0)
        for W, cols in _consumers(Wg, outputs):
            a = solve_layer(W, rw, 2, cfg)
            b = solve_layer(W, rn, 2, cfg, narrow=(outputs, cols))
            tol = 1e-8 if method == "coala" else 1e-3  # aasvd works in float32, as its authors'
            assert torch.allclose(a["A"] @ a["B"], b["A"] @ b["B"], atol=tol * float(W.abs().max()))
            assert b["rel_error"] == pytest.approx(a["rel_error"], rel=1e-6 if method == "coala"
                                                   else 1e-2)


def test_narrow_pair_bad_arguments_are_one_line_errors():
    outputs = (5, 3)
    _, _, Wg, wide, narrow = _narrow_case(outputs=outputs)
    with pytest.raises(UsageError, match="n \\+ sum\\(outputs\\) = 24 columns"):
        OutputProblem(wide, 16, 0.5, outputs=outputs)
    with pytest.raises(UsageError, match="outputs: expected None or positive ints"):
        OutputProblem(narrow, 16, 0.5, outputs=(8, 0))
    pn = OutputProblem(narrow, 16, 0.5, outputs=outputs)
    with pytest.raises(UsageError, match="cols: expected a slice of the 8 stacked outputs"):
        pn.factors(Wg[:5], 2)
    with pytest.raises(UsageError, match="W: expected 3 rows"):
        pn.factors(Wg[:5], 2, cols=slice(5, 8))
    with pytest.raises(UsageError, match="only a narrow pair"):
        OutputProblem(wide, 16, 0.5).svd(Wg[:5], slice(0, 5))
