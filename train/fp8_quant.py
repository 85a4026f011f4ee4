"""FP8 quantise-dequantise ("fake quantisation") through torch.float8_e4m3fn / float8_e5m2.

Every function returns the dequantised tensor: the exact values an FP8 GEMM would multiply, in a
dtype that holds them. Scaling granularities:

- per tensor (optionally per group, e.g. per expert): scale = fp8_max / amax / 2**margin, fp32;
- 1-D blocks of `block` consecutive elements along one dim (MXFP8: 32 with power-of-two E8M0
  scales; blockwise: 128 along the GEMM's reduction dim);
- 2-D 128 x 128 blocks (blockwise weights, DeepSeek-V3).

Block scales are powers of two rounded *up* (2**ceil(log2(amax / fp8_max))) so that no element
of a block overflows: what cuBLAS' MXFP8 recipe and TE's power-of-two block scales do.
The quantisation itself runs in fp32 whatever the input dtype: scaling a bf16 tensor in bf16
would add a rounding of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype
    max: float           # largest finite value
    min_normal: float    # smallest normal value; below it the relative error grows
    mantissa_bits: int   # relative rounding error of normal values <= 2**-(mantissa_bits + 1)


E4M3 = Fp8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0 ** -6, 3)
E5M2 = Fp8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0 ** -14, 2)


def cast_fp8(x_scaled: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """Round fp32 values (already scaled into range) to fmt, saturating at +-max (TE saturates;
    a plain cast would give inf for e5m2). -> fp32."""
    return x_scaled.clamp(-fmt.max, fmt.max).to(fmt.dtype).to(torch.float32)


def per_tensor_scale(amax: torch.Tensor, fmt: Fp8Format, margin: int = 0,
                     previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp8_max / amax / 2**margin, elementwise over amax (one per tensor or group). Where amax is
    0 or not finite the previous scale (or 1) is kept, as TE does."""
    amax = amax.float()
    keep = torch.ones_like(amax) if previous is None else previous.float()
    scale = fmt.max / amax / (2.0 ** margin)
    ok = (amax > 0) & torch.isfinite(amax)
    scale = torch.where(ok, scale, keep)
    return torch.where(torch.isinf(scale), torch.full_like(scale, torch.finfo(torch.float32).max), scale)


def quantise_scaled(x: torch.Tensor, scale: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """x * scale -> fmt -> / scale; scale broadcasts against x (a scalar, or one per row). -> x.dtype"""
    s = scale.float()
    return (cast_fp8(x.float() * s, fmt) / s).to(x.dtype)


def group_amax(x: torch.Tensor, row_groups: Optional[torch.Tensor], num_groups: int) -> torch.Tensor:
    """amax of a 2-D x [M, C] per group of rows (row_groups [M] int64), or of all of x -> [G]."""
    if x.numel() == 0:  # no rows (a rank without images runs the vision tower on zero patches)
        return torch.zeros(num_groups, device=x.device)
    if row_groups is None:
        return x.detach().abs().amax().float().reshape(1).expand(num_groups).clone()
    rows = x.detach().abs().amax(dim=-1).float()
    return torch.zeros(num_groups, device=x.device).scatter_reduce_(0, row_groups, rows, "amax")


def pow2_block_scale_inv(amax: torch.Tensor, fmt: Fp8Format) -> torch.Tensor:
    """2**ceil(log2(amax / fp8_max)), the E8M0 dequantisation scale of a block (1 for amax 0)."""
    exp = torch.ceil(torch.log2(amax.float() / fmt.max))
    exp = torch.where(amax > 0, exp, torch.zeros_like(exp)).clamp(-127, 127)
    return torch.exp2(exp)


def quantise_blocks_1d(x: torch.Tensor, fmt: Fp8Format, block: int, dim: int = -1) -> torch.Tensor:
    """Blocks of `block` consecutive elements along `dim`, each with a power-of-two scale.
    A last partial block is zero-padded (zeros change no block's amax). -> x.dtype, x.shape"""
    xt = x.float().movedim(dim, -1)
    n = xt.shape[-1]
    pad = (-n) % block
    xb = F.pad(xt, (0, pad)).unflatten(-1, (-1, block))            # [..., nb, block]
    scale_inv = pow2_block_scale_inv(xb.abs().amax(dim=-1, keepdim=True), fmt)
    q = (cast_fp8(xb / scale_inv, fmt) * scale_inv).flatten(-2)[..., :n]
    return q.movedim(-1, dim).to(x.dtype)


def quantise_blocks_2d(w: torch.Tensor, fmt: Fp8Format, block: int = 128) -> torch.Tensor:
    """block x block tiles over the last two dims (w [..., N, K]), power-of-two scales. -> w.dtype"""
    wf = w.float()
    n, k = wf.shape[-2:]
    pn, pk = (-n) % block, (-k) % block
    wp = F.pad(wf, (0, pk, 0, pn))
    tiles = wp.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [..., N/b, b, K/b, b]
    scale_inv = pow2_block_scale_inv(tiles.abs().amax(dim=(-3, -1), keepdim=True), fmt)
    q = (cast_fp8(tiles / scale_inv, fmt) * scale_inv).flatten(-2).flatten(-3, -2)
    return q[..., :n, :k].to(w.dtype)


def relative_error_bound(fmt: Fp8Format) -> float:
    """Round-to-nearest relative error of a normal value: half a unit in the last place."""
    return 2.0 ** -(fmt.mantissa_bits + 1)
