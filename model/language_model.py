"""The hybrid Gated DeltaNet / gated-attention / MoE causal language model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.context import SequenceContext, segment_layout
from model.decoder import DecoderLayer, MTPBlock
from model.moe import GroupedExperts, TopKRouter
from model.norm import GatedRMSNorm, RMSNorm, at_least_fp32
from model.rope import RotaryEmbedding


@dataclass
class LMOutput:
    """loss: the scalar to differentiate (mean CE + weighted MTP, aux and z losses).
    logits: [B, T, V], only when no labels were given. Other fields are detached-free scalars for logs."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    ce: Optional[torch.Tensor] = None
    mtp_ce: Optional[torch.Tensor] = None
    moe_aux: Optional[torch.Tensor] = None
    moe_z: Optional[torch.Tensor] = None
    num_tokens: int = 0
    extra: dict = field(default_factory=dict)


def default_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """One document per row: [0, T, 2T, ..., B*T]."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, device=device, dtype=torch.long)


class Qwen35LM(nn.Module):
    """input_ids [B, T] (+ position_ids [B, T] or [3, B, T], cu_seqlens [N+1], labels [B, T]
    already shifted, -100 = no loss) -> LMOutput."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        types = cfg.resolved_layer_types()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, types[i], cfg.layer_is_moe(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPBlock(cfg) for _ in range(cfg.mtp_num_layers))
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.resolved_mrope_section())
        self.num_moe_layers = sum(isinstance(m, TopKRouter) for m in self.modules())
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for projections, embeddings, experts and routers; norms and
        the DeltaNet decay parameters by their own rules. Also the entry point after `to_empty`."""
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.gate_up_proj, std=std)
                nn.init.normal_(m.down_proj, std=std)
            elif isinstance(m, TopKRouter):
                nn.init.normal_(m.weight, std=std)
                m.expert_bias.zero_()
                m.tokens_per_expert.zero_()
            elif isinstance(m, (RMSNorm, GatedRMSNorm, RotaryEmbedding)) or hasattr(m, "A_log"):
                m.reset_parameters()

    def build_context(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                      cu_seqlens: Optional[torch.Tensor]) -> SequenceContext:
        b, t = input_ids.shape
        if cu_seqlens is None:
            cu_seqlens = default_cu_seqlens(b, t, input_ids.device)
        doc_ids, pos_in_doc = segment_layout(cu_seqlens, b, t)
        if position_ids is None:
            position_ids = pos_in_doc
        cos, sin = self.rotary(position_ids)
        return SequenceContext(cu_seqlens=cu_seqlens, doc_ids=doc_ids, pos_in_doc=pos_in_doc,
                               cos=cos, sin=sin)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> LMOutput:
        ctx = self.build_context(input_ids, position_ids, cu_seqlens)
        emb = self.embed_tokens(input_ids)
        h = emb
        for layer in self.layers:
            h = layer(h, ctx)
        if labels is None:
            return LMOutput(logits=self.lm_head(self.norm(h)))

        ce = cross_entropy(self.lm_head(self.norm(h)), labels)
        out = LMOutput(ce=ce, num_tokens=int((labels != -100).sum()))
        loss = ce
        if self.mtp:
            out.mtp_ce = self._mtp_loss(h, input_ids, labels, ctx)
            loss = loss + self.cfg.mtp_loss_coef * out.mtp_ce
        if self.num_moe_layers:
            n = self.num_moe_layers
            out.moe_aux = ctx.aux_losses["moe_aux"] / n
            out.moe_z = ctx.aux_losses["moe_z"] / n
            loss = loss + self.cfg.router_aux_loss_coef * out.moe_aux
            if self.cfg.router_z_loss_coef > 0:
                loss = loss + self.cfg.router_z_loss_coef * out.moe_z
        out.loss = loss
        return out

    def _mtp_loss(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                  ctx: SequenceContext) -> torch.Tensor:
        """Mean over depths k = 1..D of the CE of predicting token i+k+1 at position i.

        Position i is valid for depth k while i+k lies in the same document, i.e. none of
        labels[i .. i+k-1] is -100; the embedding input is token i+k.
        """
        valid = torch.ones_like(labels, dtype=torch.bool)
        total = 0.0
        for k, block in enumerate(self.mtp, start=1):
            valid = valid & (shift_left(labels, k - 1, -100) != -100)
            ids_k = torch.where(valid, shift_left(input_ids, k, 0), torch.zeros_like(input_ids))
            target = torch.where(valid, shift_left(labels, k, -100), torch.full_like(labels, -100))
            h = block(h, self.embed_tokens(ids_k), ctx)
            total = total + cross_entropy(self.lm_head(block.norm(h)), target)
        return total / len(self.mtp)


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i] <- x[:, i + k] along T, filling the last k positions. x: [B, T]."""
    if k == 0:
        return x
    return torch.cat([x[:, k:], torch.full_like(x[:, :k], fill)], dim=1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labels != -100 in fp32; 0 (with a graph) when there is none. [B,T,V],[B,T] -> []"""
    loss = F.cross_entropy(at_least_fp32(logits).flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss / (labels != -100).sum().clamp(min=1)
