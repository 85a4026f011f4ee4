"""Gated full attention (Qwen3-Next / Qwen3.5): q/k RMSNorm, partial rotary, GQA, and a per-head
sigmoid output gate produced by doubling the q projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.context import SequenceContext
from model.norm import RMSNorm
from model.rope import apply_rotary


class GatedAttention(nn.Module):
    """x [B, T, D] -> [B, T, D]; causal and block-diagonal over the packed documents of ctx."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        # Each head's 2*head_dim outputs are [query | gate], interleaved per head as released.
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        # The KV heads this module attends with: all of them, unless a tensor-parallel plan with
        # more ranks than KV heads keeps only the one its query heads share.
        self.kv_heads = slice(None)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, gate = self.q_proj(x).view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)[:, :, self.kv_heads]
        v = self.v_proj(x).view(b, t, -1, self.head_dim)[:, :, self.kv_heads]
        q = apply_rotary(self.q_norm(q), ctx.cos, ctx.sin)
        k = apply_rotary(self.k_norm(k), ctx.cos, ctx.sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=ctx.attention_mask(), enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)  # [B, T, H, hd]
        out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(b, t, -1))
