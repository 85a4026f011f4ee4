"""Rotary position embedding: partial rotary with interleaved multimodal (t, h, w) sections.

Positions come as [3, B, T] (t, h, w rows; text tokens have t == h == w) or [B, T] for text only.
Frequency f (of rotary_dim/2) reads the h row if f % 3 == 1 and f < 3 * s_h, the w row if
f % 3 == 2 and f < 3 * s_w, and the t row otherwise: the released models' interleaved M-RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from model.norm import at_least_fp32


def mrope_row_of_frequency(num_freqs: int, section: list[int]) -> torch.Tensor:
    """[num_freqs] long: which position row (0=t, 1=h, 2=w) drives each frequency."""
    f = torch.arange(num_freqs)
    row = torch.zeros(num_freqs, dtype=torch.long)
    row[(f % 3 == 1) & (f < 3 * section[1])] = 1
    row[(f % 3 == 2) & (f < 3 * section[2])] = 2
    return row


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin) of shape [B, T, rotary_dim] in fp32."""

    def __init__(self, rotary_dim: int, theta: float, mrope_section: list[int]):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.mrope_section = list(mrope_section)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.register_buffer("freq_row", mrope_row_of_frequency(rotary_dim // 2, self.mrope_section),
                             persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        return 1.0 / (self.theta ** exponent)

    def reset_parameters(self) -> None:
        # Buffers built on the meta device need real values once the model is materialised (in
        # the dtype the model was cast to, as a model built whole and then cast holds them).
        self.inv_freq = self._inv_freq().to(self.inv_freq.device, self.inv_freq.dtype)
        self.freq_row = mrope_row_of_frequency(self.rotary_dim // 2, self.mrope_section).to(
            self.freq_row.device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        pos = position_ids.float()  # [3, B, T]
        # Pick, per frequency, the position row that drives it: [B, T, F].
        pos_per_freq = pos.permute(1, 2, 0)[..., self.freq_row]
        angles = pos_per_freq * self.inv_freq
        emb = torch.cat([angles, angles], dim=-1)  # rotate-half layout: [B, T, rotary_dim]
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [B, T, H, D] (rotate-half); the rest pass through."""
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    x_rot = at_least_fp32(x_rot)
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat([out.to(x.dtype), x_pass], dim=-1)
