"""The Gated DeltaNet mixer (Qwen3.5 layout: separate qkv, z, b, a projections)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.context import SequenceContext
from model.context_parallel import conv_halo, gated_delta_cp
from model.norm import GatedRMSNorm, at_least_fp32
from model.ops.gated_delta import chunk_gated_delta_rule


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, pos_in_doc: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution whose window restarts at every document boundary.

    x: [B, T, C], weight: [C, 1, K] (nn.Conv1d layout), pos_in_doc: [B, T] -> [B, T, C].
    Tap j reads x[t - j] and is dropped where t - j lies in an earlier document, which is what a
    per-document zero-padded convolution computes.
    """
    k = weight.shape[-1]
    t = x.shape[1]
    out = x * weight[:, 0, k - 1]
    for j in range(1, k):
        shifted = F.pad(x, (0, 0, j, 0))[:, :t]
        keep = (pos_in_doc >= j).unsqueeze(-1).to(x.dtype)
        out = out + shifted * keep * weight[:, 0, k - 1 - j]
    return out


class GatedDeltaNet(nn.Module):
    """x [B, T, D] -> [B, T, D]; the recurrent state and the conv window reset per document."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_k_heads = cfg.linear_num_key_heads
        self.num_v_heads = cfg.linear_num_value_heads
        self.head_k_dim = cfg.linear_key_head_dim
        self.head_v_dim = cfg.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim

        # q, k and v as separate projections and depthwise convolutions (the released checkpoints
        # fuse them as in_proj_qkv / conv1d; model/hf splits): each is then sharded head-wise by
        # tensor parallelism as it stands, where a fused [q | k | v] would need a strided shard.
        self.in_proj_q = nn.Linear(d, self.key_dim, bias=False)
        self.in_proj_k = nn.Linear(d, self.key_dim, bias=False)
        self.in_proj_v = nn.Linear(d, self.value_dim, bias=False)
        self.in_proj_z = nn.Linear(d, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(d, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(d, self.num_v_heads, bias=False)
        k = cfg.linear_conv_kernel_dim
        self.conv_q = nn.Conv1d(self.key_dim, self.key_dim, k, groups=self.key_dim, bias=False)
        self.conv_k = nn.Conv1d(self.key_dim, self.key_dim, k, groups=self.key_dim, bias=False)
        self.conv_v = nn.Conv1d(self.value_dim, self.value_dim, k, groups=self.value_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, d, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A ~ U(0.01, 16) as in the released Qwen3.5 code; dt_bias = 1.
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
            self.dt_bias.fill_(1.0)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        b, t, _ = x.shape
        # One convolution over the concatenated channels (the local heads under tensor parallelism).
        qkv = torch.cat([self.in_proj_q(x), self.in_proj_k(x), self.in_proj_v(x)], dim=-1)
        weight = torch.cat([self.conv_q.weight, self.conv_k.weight, self.conv_v.weight])
        if ctx.cp is None:
            qkv = causal_conv1d(qkv, weight, ctx.pos_in_doc)
        else:  # the window reaches into the previous rank's slice
            width = weight.shape[-1] - 1
            ext, pos = conv_halo(qkv, ctx.pos_in_doc, width, ctx.cp)
            qkv = causal_conv1d(ext, weight, pos)[:, width:]
        qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        # The kernel takes packed documents as B == 1 with cu_seqlens over all B*T tokens.
        q = q.reshape(1, b * t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(1, b * t, self.num_k_heads, self.head_k_dim)
        v = v.reshape(1, b * t, self.num_v_heads, self.head_v_dim)
        beta = torch.sigmoid(at_least_fp32(self.in_proj_b(x))).reshape(1, b * t, self.num_v_heads)
        # fp32: softplus and exp of the decay lose too much in bf16.
        a = at_least_fp32(self.in_proj_a(x))
        g = -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))
        g = g.reshape(1, b * t, self.num_v_heads)
        if ctx.cp is None:
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=ctx.cu_seqlens,
                                          use_qk_l2norm_in_kernel=True)
        else:  # the state passed from the earlier ranks' slices
            o = gated_delta_cp(chunk_gated_delta_rule, q, k, v, g, beta, ctx.cu_seqlens,
                               ctx.cp.continues, ctx.cp)
        z = self.in_proj_z(x).view(b, t, self.num_v_heads, self.head_v_dim)
        o = self.norm(o.view(b, t, self.num_v_heads, self.head_v_dim), z)
        return self.out_proj(o.reshape(b, t, self.value_dim))
