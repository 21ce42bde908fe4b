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
