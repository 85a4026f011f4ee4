"""Parameter counts and training FLOPs per token, from a model built on the meta device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import FULL_ATTENTION, ModelConfig
from model.moe import GroupedExperts


@dataclass
class ParamCounts:
    total: int            # every parameter: embedding, LM head and vision tower included
    active: int           # of the language model, touched per token: routed experts counted k of E
    embedding: int        # input embedding + LM head (once if tied)
    mtp: int              # inside the multi-token-prediction blocks (in total and active)
    vision: int = 0       # the vision tower incl. its merger (in total, not in active: it runs
                          # per image patch, not per language token)


def build_meta(cfg: ModelConfig) -> nn.Module:
    """The model on the meta device: shapes only, nothing allocated."""
    from model.language_model import Qwen35LM

    with torch.device("meta"):
        return Qwen35LM(cfg)


def count_params(model: nn.Module) -> ParamCounts:
    cfg: ModelConfig = model.cfg
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            per_expert = (m.gate_up_proj.numel() + m.down_proj.numel()) // m.num_experts
            inactive += per_expert * (m.num_experts - cfg.num_experts_per_tok)
    emb = model.embed_tokens.weight.numel()
    if not cfg.tie_word_embeddings:
        emb += model.lm_head.weight.numel()
    mtp = sum(p.numel() for p in model.mtp.parameters())
    vision = sum(p.numel() for p in model.visual.parameters()) if model.visual is not None else 0
    return ParamCounts(total=total, active=total - inactive - vision, embedding=emb, mtp=mtp,
                       vision=vision)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, counts: ParamCounts) -> float:
    """Forward + backward FLOPs per trained token (3 x forward).

    Matmuls: 2 per active non-embedding parameter (the LM head is a matmul, the embedding a lookup).
    Causal attention over documents of length seq_len: 2 * 2 * H * head_dim * seq_len / 2 per layer.
    Chunked delta rule (chunk C=64) per value head: 2*C*(d_k + d_v) within chunks + 6*d_k*d_v for
    the state terms.
    """
    # The input embedding is a lookup; with tied weights its matrix is still the LM head's matmul.
    matmul_params = counts.active - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    fwd = 2.0 * matmul_params
    types = cfg.resolved_layer_types() + [FULL_ATTENTION] * cfg.mtp_num_layers
    dk, dv, c = cfg.linear_key_head_dim, cfg.linear_value_head_dim, 64
    for t in types:
        if t == FULL_ATTENTION:
            fwd += 2.0 * cfg.num_attention_heads * cfg.head_dim * seq_len
        else:
            fwd += cfg.linear_num_value_heads * (2.0 * c * (dk + dv) + 6.0 * dk * dv)
    return 3.0 * fwd
