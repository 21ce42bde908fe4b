"""One layer's factors: the methods by name, the exact error, and cond(R).

Pure: tensors in, tensors out. COALA (Parkina et al., arXiv 2507.07580) is
``W R^T = U S V^T, A = U_r, B = U_r^T W``: no Gram matrix, no inverse; the
baselines (svd, svdllm, asvd) come from `coala_stream.baselines`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..baselines import NumericalFallbackWarning, asvd_factors, svd_factors, svdllm_factors
from ..errors import CoalaError
from ..linalg import balance_factors, coala_factors, coala_svd, tail_energy


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
                spectrum: torch.Tensor | None = None) -> dict:
    """Factors of one layer: {"A", "B", "rel_error", "mu", "spectrum", "note", ...}.

    ``reduced`` is the store's ReducedInput (R, abs_sum, gram, tokens). The
    relative error is exact on the calibration data:
    ``||(W - A B) R^T||_F / ||W R^T||_F``, computed in R's dtype (>= float32).
    """
    out: dict = {"mu": 0.0, "note": "", "spectrum": spectrum}
    A, B = FACTORIZERS[config.method](W, reduced, rank, config, out)
    spectrum = out["spectrum"]
    R = reduced.R
    if config.format == "peft":
        A, B = balance_factors(A, B)  # LoRA trains best with sqrt(S) on each side, as PiSSA's
    out.update(A=A, B=B, rel_error=relative_error(W, A, B, R), spectrum=spectrum)
    return out


def _coala(W, reduced, rank, config, out):
    R, mu = reduced.R, 0.0
    if config.mu > 0:
        mu = config.mu * float(R.double().square().sum()) / R.shape[1]
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
    if reduced.gram is not None:
        gram, source = reduced.gram.to(W.device), "stored"
    else:  # as peers hold it: float32 (from R here, since reduce ran without --with-gram)
        R32 = reduced.R.to(torch.float32)
        gram, source = R32.T @ R32, "R"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumericalFallbackWarning)
        try:
            A, B = svdllm_factors(W, gram, rank)
        except torch.linalg.LinAlgError as exc:
            raise CoalaError(f"svdllm: {exc} (the Gram matrix is too ill-conditioned; "
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


# method name (`config.METHODS`) -> f(W, reduced, rank, config, out) -> (A, B); f may add
# "mu", "note", "spectrum", "gram_source" to ``out`` (the report's row)
FACTORIZERS = {"coala": _coala, "svd": _svd, "svdllm": _svdllm, "asvd": _asvd}


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
