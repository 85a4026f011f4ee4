"""Gated full attention (Qwen3-Next / Qwen3.5): q/k RMSNorm, partial rotary, GQA, and a per-head
sigmoid output gate produced by doubling the q projection."""

from __future__ import annotations

import torch
from torch import nn

from model.attention_backend import packed_attention
from model.config import ModelConfig
from model.context import SequenceContext
from model.norm import RMSNorm
from model.rope import apply_rotary


class GatedAttention(nn.Module):
    """x [B, T, D] -> [B, T, D]; causal and block-diagonal over the packed documents of ctx,
    through the attention seam (model/attention_backend.py, `model.attn_backend`)."""

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
        self.attn_backend = cfg.attn_backend

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        b, t, _ = x.shape
        q, gate = self.q_proj(x).view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)[:, :, self.kv_heads]
        v = self.v_proj(x).view(b, t, -1, self.head_dim)[:, :, self.kv_heads]
        q = apply_rotary(self.q_norm(q), ctx.cos, ctx.sin)
        k = apply_rotary(self.k_norm(k), ctx.cos, ctx.sin)
        # The packed rows as one token stream: documents never cross a row boundary.
        q, k, v = (x.reshape(b * t, x.shape[2], self.head_dim) for x in (q, k, v))
        q_start, bounds = 0, ctx.cu_seqlens
        if ctx.cp is not None:  # context parallel: this rank's queries against every rank's keys
            k, v = ctx.cp.all_gather(torch.stack([k, v], dim=1)).unbind(1)  # one collective
            q_start, bounds = ctx.cp.start, ctx.cp.cu_seqlens
        if ctx.key_bounds is not None:  # the same boundaries, already on the host
            bounds = ctx.key_bounds
        out = packed_attention(q, k, v, bounds, causal=True, q_start=q_start,
                               backend=self.attn_backend).view(b, t, self.num_heads, self.head_dim)
        out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(b, t, -1))
