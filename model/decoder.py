"""Decoder layer (norm -> mixer -> residual -> norm -> MLP -> residual) and the multi-token
prediction block."""

from __future__ import annotations

import torch
from torch import nn

from model.attention import GatedAttention
from model.config import FULL_ATTENTION, ModelConfig
from model.context import SequenceContext
from model.gated_deltanet import GatedDeltaNet
from model.mlp import SwiGLU
from model.moe import SparseMoE
from model.norm import RMSNorm


class DecoderLayer(nn.Module):
    """x [B, T, D] -> [B, T, D]. The mixer is `self_attn` or `linear_attn` (released names)."""

    def __init__(self, cfg: ModelConfig, layer_type: str, moe: bool):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer_type == FULL_ATTENTION:
            self.self_attn = GatedAttention(cfg)
        else:
            self.linear_attn = GatedDeltaNet(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    @property
    def mixer(self) -> nn.Module:
        return self.self_attn if self.layer_type == FULL_ATTENTION else self.linear_attn

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class MTPBlock(nn.Module):
    """One depth of multi-token prediction (DeepSeek-V3 / Qwen3-Next style):
    h' = layer(fc([norm(emb(t_{i+k})) ; norm(h_i)])). The embedding and LM head are the main model's.

    h, emb: [B, T, D] -> (h' [B, T, D] before the block's final norm, norm(h') for the LM head).
    The norm runs inside forward so that a wrapper of the block (FSDP) has its weights gathered.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_fc_norm_embedding = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.layer = DecoderLayer(cfg, FULL_ATTENTION, moe=cfg.mlp_type == "moe")
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor,
                ctx: SequenceContext) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(h)], dim=-1))
        h = self.layer(x, ctx)
        return h, self.norm(h)
