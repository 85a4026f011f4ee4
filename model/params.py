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


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of forward + backward per trained token, counted as Megatron-Bridge counts
    hybrid Gated DeltaNet models (megatron/bridge/training/utils/flop_utils.py, the transformer
    path with experimental_attention_variant="gated_delta_net"), so that model TFLOP/s compare
    with its recipes. In multiply-adds (MACs) per token, forward:

      gated attention  D*(2q + 2kv) + q*D + q*S        q = H*hd (query, and again for the output
                                                       gate), kv = H_kv*hd; causal QK^T and AV over
                                                       S = seq_len: 2 x q*S/2
      Gated DeltaNet   D*(2k + 2v + 2Hv) + K*(2k + v)  k = Hk*dk, v = Hv*dv: in_proj q,k,v,z,b,a;
                       + 4*Hv*dk*dv + D*v              the causal conv (width K); the recurrent state
                                                       terms (Megatron: 4*Hv*dv^2 with dk = dv); out_proj
      MoE MLP          3*D*(Fe*top_k + Fs)             SwiGLU: gate, up, down of each routed expert
      dense MLP        3*D*F                           and the shared expert
      LM head          D*V per prediction depth        (1 + mtp_num_layers)
      MTP block        3*D + 2*D^2 (norms, eh_proj) + its layer (full attention + MLP)

    and FLOPs = 2 per MAC x 3 (backward = 2 x forward). Left out, as Megatron-Bridge leaves them:
    norms, routers, the shared-expert gate, activations, the embedding lookup, and the vision tower
    (which runs per image patch). One difference: Megatron-Bridge's layer pattern counts the MTP
    block's mixer as a Gated DeltaNet layer (it extends the 3:1 pattern over it); it is gated
    attention here, as the model computes it. Attention over S = seq_len is Megatron's unpacked
    convention; packed documents shorter than a row do less attention work.
    """
    d = cfg.hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = d * (2 * q + 2 * kv) + q * d + q * seq_len
    k, v, hv = (cfg.linear_num_key_heads * cfg.linear_key_head_dim,
                cfg.linear_num_value_heads * cfg.linear_value_head_dim, cfg.linear_num_value_heads)
    gdn = (d * (2 * k + 2 * v + 2 * hv) + cfg.linear_conv_kernel_dim * (2 * k + v)
           + 4 * hv * cfg.linear_key_head_dim * cfg.linear_value_head_dim + d * v)
    moe = 3 * d * (cfg.moe_intermediate_size * cfg.num_experts_per_tok
                   + cfg.shared_expert_intermediate_size)
    dense = 3 * d * cfg.intermediate_size

    def mlp(i: int) -> int:
        return moe if cfg.layer_is_moe(i) else dense

    macs = sum((attention if t == FULL_ATTENTION else gdn) + mlp(i)
               for i, t in enumerate(cfg.resolved_layer_types()))
    mtp_mlp = mlp(cfg.num_layers - 1)  # an MTP block's MLP is the last layer's kind
    macs += cfg.mtp_num_layers * (3 * d + 2 * d * d + attention + mtp_mlp)
    macs += d * cfg.vocab_size * (1 + cfg.mtp_num_layers)
    return 6.0 * macs
