"""One layer's factors: the methods by name, the exact error, and cond(R).

Pure: tensors in, tensors out. COALA (Parkina et al., arXiv 2507.07580) is
``W R^T = U S V^T, A = U_r, B = U_r^T W``: no Gram matrix, no inverse; the
baselines (svd, svdllm, asvd) come from `coala_stream.baselines`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..baselines import (NumericalFallbackWarning, aasvd_factors, asvd_factors, svd_factors,
                         svdllm_factors)
from ..errors import CoalaError
from ..linalg import balance_factors, coala_factors, coala_svd, tail_energy
from ..objective import OutputProblem

if TYPE_CHECKING:
    from .config import SolveConfig


@dataclass
class Layer:
    """One linear layer to compress: its input in the store, shape, and what solve decided."""

    name: str
    input: str
    m: int
    n: int
    rank: int = 0
    spectrum: torch.Tensor | None = None  # singular values of W R^T (mu = 0), when computed

    @property
    def cost(self) -> int:
        """Parameters per unit of rank."""
        return self.m + self.n

    def saves_parameters(self, rank: int | None = None) -> bool:
        rank = self.rank if rank is None else rank
        return rank * (self.m + self.n) < self.m * self.n


def solve_layer(W: torch.Tensor, reduced, rank: int, config: SolveConfig,
                spectrum: torch.Tensor | None = None, *, problems: dict | None = None,
                with_error: bool = True, narrow: tuple | None = None) -> dict:
    """Factors of one layer: {"A", "B", "rel_error", "mu", "spectrum", "note", ...}.

    ``reduced`` is the store's ReducedInput (R, abs_sum, gram, tokens); for the output
    objective (``config.objective == "output"``) that of the pair [Xh | X], otherwise
    that of the layer's inputs (`input_view` of a pair). The relative error is exact on
    the calibration data: ``||(W - A B) R^T||_F / ||W R^T||_F`` for the input objective,
    ``||T W^T - Xh (A B)^T||_F / ||T W^T||_F`` for the output objective, computed in
    R's dtype (>= float32; float64 for the output objective); ``with_error=False`` skips it
    (rel_error None: a caller that keeps only the factors).

    ``problems``: a dict the caller keeps per input (empty at first) in which the output
    objective's per-input work (`objective.OutputProblem`: checks, R11's conditioning, the
    float64 target) is kept for the next layer reading the same input.

    ``narrow``: (outputs, cols) when the pair is the narrow [Xh | X W_g^T]
    (`InputInfo.narrow`, `objective.OutputProblem`), None for [Xh | X].
    """
    out: dict = {"mu": 0.0, "note": "", "spectrum": spectrum}
    output = config.objective == "output"
    if output:
        A, B = OUTPUT_FACTORIZERS[config.method](W, reduced, rank, config, out,
                                                 {} if problems is None else problems, narrow)
    else:
        A, B = FACTORIZERS[config.method](W, reduced, rank, config, out)
    spectrum = out["spectrum"]
    if config.format == "peft":
        A, B = balance_factors(A, B)  # LoRA trains best with sqrt(S) on each side, as PiSSA's
    err = (_rel_error(W, A, B, reduced.R, config, out["mu"], problems, narrow)
           if with_error else None)
    out.update(A=A, B=B, rel_error=err, spectrum=spectrum)
    return out


def _rel_error(W, A, B, R, config, mu, problems, narrow=None) -> float:
    if config.objective == "output":
        problem = output_problem(R, W.shape[1], config.alpha, mu, problems, narrow)
        return problem.relative_error(W, A, B, *_cols(narrow)) ** 0.5
    return relative_error(W, A, B, R)


def output_problem(R: torch.Tensor, n: int, alpha: float, mu: float,
                   problems: dict | None, narrow: tuple | None = None) -> OutputProblem:
    """The `OutputProblem` of (R, alpha, mu), from ``problems`` (kept per input) when there."""
    outputs = None if narrow is None else narrow[0]
    if problems is None:
        return OutputProblem(R, n, alpha, mu, outputs=outputs)
    key = (float(alpha), float(mu))
    if key not in problems:
        problems[key] = OutputProblem(R, n, alpha, mu, outputs=outputs)
    return problems[key]


def _cols(narrow: tuple | None) -> tuple:
    """The ``cols`` argument of `OutputProblem`'s layer methods: () for the wide pair."""
    return () if narrow is None else (narrow[1],)


def known_factors(W: torch.Tensor, reduced, A: torch.Tensor, B: torch.Tensor,
                  config: SolveConfig, note: str, problems: dict | None = None,
                  narrow: tuple | None = None) -> dict:
    """`solve_layer`'s result for factors computed elsewhere (a propagating capture's, possibly
    refined): the same relative error and mu; no spectrum (the factors need not be optimal)."""
    n = W.shape[1]
    A, B = A.to(W.device), B.to(W.device)
    mu = absolute_mu(config, reduced.R[:n, :n]) if config.method == "coala" else 0.0
    err = _rel_error(W, A, B, reduced.R, config, mu, problems, narrow)
    if config.format == "peft":
        A, B = balance_factors(A, B)
    return {"A": A, "B": B, "rel_error": err, "mu": mu, "spectrum": None, "note": note}


def input_view(reduced, n: int):
    """The ReducedInput of Xh alone from that of the pair [Xh | X] (n features each).

    R of [Xh | X] is [[R11, R12], [0, R22]] with R11 the R of Xh (the QR of the first
    n columns does not see the others), so nothing is refolded: R11, the first n column
    sums and the top-left Gram block are Xh's.
    """
    from dataclasses import replace

    R = reduced.R[:n, :n]
    return replace(reduced, R=R,
                   abs_sum=None if reduced.abs_sum is None else reduced.abs_sum[:n],
                   gram=None if reduced.gram is None else reduced.gram[:n, :n])


def absolute_mu(config: SolveConfig, R: torch.Tensor) -> float:
    """--mu is relative to the mean input energy: F * ||R||_F^2 / n (R of the layer's inputs)."""
    # mu None: a config not resolved from a store (a library call), hence none, as 0
    return config.mu * float(R.double().square().sum()) / R.shape[1] if config.mu else 0.0


def _coala(W, reduced, rank, config, out):
    R, mu = reduced.R, 0.0
    if config.mu:  # validated >= 0; None and 0 both mean none
        mu = absolute_mu(config, R)
        if config.adaptive_mu:
            if out["spectrum"] is None:
                out["spectrum"] = coala_svd(W, R)[1]
            mu *= normalised_tail(out["spectrum"], rank)
        A, B = coala_factors(W, R, rank, mu=mu)
    else:
        A, B, S = coala_factors(W, R, rank, return_singular_values=True)
        out["spectrum"] = S if out["spectrum"] is None else out["spectrum"]
    out["mu"] = mu
    return A, B


def _svd(W, reduced, rank, config, out):
    return svd_factors(W, rank)


def _asvd(W, reduced, rank, config, out):
    abs_mean = reduced.abs_sum.to(torch.float64) / max(int(reduced.tokens), 1)
    return asvd_factors(W, abs_mean.to(W.device), rank, alpha=config.asvd_alpha)


def _svdllm(W, reduced, rank, config, out):
    return _through_gram("svdllm", W, reduced, out, lambda gram: svdllm_factors(W, gram, rank))


def _through_gram(method: str, W, reduced, out, factors):
    """A Gram-based baseline as peers run it: the Gram matrix in float32 (stored by reduce
    --with-gram, else formed from R), ``factors(gram)``; its damping fallbacks go to the
    report's note, a failed Cholesky becomes a CoalaError naming the Gram-free method."""
    if reduced.gram is not None:
        gram, source = reduced.gram.to(W.device), "stored"
    else:  # as peers hold it: float32 (from R here, since reduce ran without --with-gram)
        R32 = reduced.R.to(torch.float32)
        gram, source = R32.T @ R32, "R"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumericalFallbackWarning)
        try:
            A, B = factors(gram)
        except torch.linalg.LinAlgError as exc:
            raise CoalaError(f"{method}: {exc} (the Gram matrix is too ill-conditioned; "
                             f"--method coala needs no Cholesky)") from exc
    out["note"] = "; ".join(str(w.message) for w in caught
                            if issubclass(w.category, NumericalFallbackWarning))
    out["gram_source"] = source
    return A, B


def relative_error(W, A, B, R) -> float:
    """||(W - A B) R^T||_F / ||W R^T||_F (0 when W R^T = 0), in R's dtype (>= float32)."""
    dtype = torch.promote_types(R.dtype, torch.float32)
    Wd, Rd = W.to(dtype), R.to(dtype)
    total = torch.linalg.norm(Wd @ Rd.T)
    if float(total) == 0.0:
        return 0.0
    return float(torch.linalg.norm((Wd - A.to(dtype) @ B.to(dtype)) @ Rd.T) / total)


def _coala_output(W, reduced, rank, config, out, problems, narrow=None):
    """The output objective, Gram-free (`objective.output_factors`): one SVD of W R12'^T."""
    n = W.shape[1]
    mu = absolute_mu(config, reduced.R[:n, :n])
    cols = _cols(narrow)
    if config.adaptive_mu:
        if out["spectrum"] is None:
            out["spectrum"] = output_problem(reduced.R, n, config.alpha, 0.0, problems,
                                             narrow).svd(W, *cols)[1]
        mu *= normalised_tail(out["spectrum"], rank)
    problem = output_problem(reduced.R, n, config.alpha, mu, problems, narrow)
    A, B, S = problem.factors(W, rank, return_singular_values=True, cols=cols[0] if cols else None)
    if out["spectrum"] is None and mu == 0:
        out["spectrum"] = S
    out["mu"] = mu
    return A, B


def _aasvd(W, reduced, rank, config, out, problems, narrow=None):
    """AA-SVD as its authors compute it: float32 Gram blocks of [Xh | X], Cholesky, inverse."""
    cols = None if narrow is None else narrow[1]
    return _through_gram("aasvd", W, reduced, out,
                         lambda gram: aasvd_factors(W, gram, rank, config.alpha, cols=cols))


def layer_spectrum(W: torch.Tensor, reduced, config: SolveConfig,
                   narrow: tuple | None = None) -> torch.Tensor:
    """Singular values whose tail is the exact error of every rank (mu = 0), for allocation:
    of W R^T (input objective), of W R12'^T (output objective, `objective.output_svd`)."""
    if config.objective == "output":
        return OutputProblem(reduced.R, W.shape[1], config.alpha,
                             outputs=None if narrow is None else narrow[0]).svd(W, *_cols(narrow))[1]
    return coala_svd(W, reduced.R)[1]


# method name (`config.METHODS`) -> f(W, reduced, rank, config, out) -> (A, B); f may add
# "mu", "note", "spectrum", "gram_source" to ``out`` (the report's row)
FACTORIZERS = {"coala": _coala, "svd": _svd, "svdllm": _svdllm, "asvd": _asvd}
# ... for the output objective (reduced is the pair's: R of [Xh | X]); they also take the
# caller's per-input dict of `OutputProblem`s and the narrow pair's (outputs, cols) (see
# `solve_layer`)
OUTPUT_FACTORIZERS = {"coala": _coala_output, "aasvd": _aasvd}


def normalised_tail(S: torch.Tensor, rank: int) -> float:
    """sum_{i >= rank} S_i^2 / sum S_i^2: the squared relative error of the best rank-r fit."""
    tail = tail_energy(S)
    total = float(tail[0])
    return float(tail[min(rank, len(S))]) / total if total > 0 else 0.0


def cond_estimate(R: torch.Tensor, iterations: int = 30) -> tuple[float, str]:
    """Estimate of cond(R) (= cond(X), the square root of cond(X^T X)), in O(n^2) per step.

    sigma_max by power iteration on R^T R, sigma_min by inverse iteration with two
    triangular solves per step (R is square upper-triangular here, checked to have no
    zero on its diagonal first), both from a fixed start in float64, so the figure is
    deterministic; it is a lower bound that is close for the spread spectra of real
    activations. An exact SVD of R (O(n^3)) cost more than the factors of the layer.
    inf if R has fewer rows than columns (fewer tokens than features), a zero pivot,
    or a smallest singular value below float64 range.
    """
    k, n = R.shape
    if k < n:
        return math.inf, "rows<n"
    Rd = R[:n].to(torch.float64)
    if not bool((torch.diagonal(Rd) != 0).all()):
        return math.inf, "singular"
    g = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(n, 1, generator=g, dtype=torch.float64).to(Rd.device)
    w = v.clone()
    for _ in range(iterations):
        v = Rd.T @ (Rd @ v)
        v = v / torch.linalg.norm(v)
        y = torch.linalg.solve_triangular(Rd.T, w, upper=False)
        w = torch.linalg.solve_triangular(Rd, y, upper=True)
        w = w / torch.linalg.norm(w)
        if not bool(torch.isfinite(w).all()):
            return math.inf, "est"
    s_max, s_min = float(torch.linalg.norm(Rd @ v)), float(torch.linalg.norm(Rd @ w))
    return (s_max / s_min if s_min > 0 else math.inf), "est"
