"""`LowRankLinear`: an (out x in) linear layer stored as rank-r factors, and the swap."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CoalaError


class LowRankLinear(nn.Module):
    """``y = A(B(x))``: an (out x in) linear layer stored as rank-r factors.

    ``B``: nn.Linear(in, r, bias=False); ``A``: nn.Linear(r, out) with the
    original layer's bias. Parameters r (in + out) (+ out for the bias) instead
    of in x out. Cost per token 2 r (in + out) flops.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.A = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """An uninitialised LowRankLinear of the same shape, dtype and device as ``linear``."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                   device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_in_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named nn.Linear of ``model`` by a LowRankLinear of the given rank (in place)."""
    for name, rank in ranks.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise CoalaError(f"factorized checkpoint names {name!r}, which is not an nn.Linear of "
                             f"the rebuilt {type(model).__name__} (found {type(old).__name__})")
        setattr(parent, child, LowRankLinear.from_linear(old, int(rank)))
