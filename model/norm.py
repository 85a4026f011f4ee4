"""Normalisation layers, computed in fp32 whatever the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or unchanged when it is already wider (fp64 reference runs stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = x * rsqrt(mean(x^2) + eps) * (1 + w), w initialised to 0.

    The zero-centred weight lets weight decay pull the gain towards 1 rather than 0.
    x: [..., D] -> [..., D] in x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.to(x32.dtype))).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm then SiLU gate, as in Gated DeltaNet: y = w * x / rms(x) * silu(z).

    The weight is a plain gain initialised to 1 (not zero-centred), following the reference.
    x, z: [..., D] -> [..., D] in x's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight.to(x32.dtype) * y * F.silu(z.to(x32.dtype))
        return y.to(x.dtype)
