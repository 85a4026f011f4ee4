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
from model.init import draw_seed, init_model_
from model.loss import TokenCrossEntropy, mean_over_labels
from model.moe import TopKRouter
from model.mrope import mrope_position_ids
from model.norm import RMSNorm
from model.rope import RotaryEmbedding
from model.vision import VisionEncoder
from model.vision_tokens import check_placeholder_counts


# The model's visual inputs, as a loader batch names them (beside input_ids, labels, positions).
VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class LMOutput:
    """loss: the scalar to differentiate (mean CE + weighted MTP, aux and z losses).
    logits: [B, T, V], only when no labels were given. Other fields are detached-free scalars for logs.
    Models with vision also split the CE by modality (detached): ce_after_vision over the target
    positions that follow a visual block of their document, ce_text over the rest (see
    `after_vision_mask`); num_tokens_after_vision + num_tokens_text == num_tokens."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    ce: Optional[torch.Tensor] = None
    mtp_ce: Optional[torch.Tensor] = None
    moe_aux: Optional[torch.Tensor] = None
    moe_z: Optional[torch.Tensor] = None
    num_tokens: int = 0
    ce_after_vision: Optional[torch.Tensor] = None
    ce_text: Optional[torch.Tensor] = None
    num_tokens_after_vision: int = 0
    num_tokens_text: int = 0
    extra: dict = field(default_factory=dict)


def default_cu_seqlens(batch: int, seqlen: int, device) -> torch.Tensor:
    """One document per row: [0, T, 2T, ..., B*T]."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, device=device, dtype=torch.long)


class Qwen35LM(nn.Module):
    """input_ids [B, T] (+ position_ids [B, T] or [3, B, T], cu_seqlens [N+1], labels [B, T]
    already shifted, -100 = no loss) -> LMOutput.

    With `cfg.vision`, also pixel_values [Ni, C*Tp*P*P] + image_grid_thw [Ni_items, 3] and
    pixel_values_videos + video_grid_thw (model/vision_processing.py makes them): every image and
    video of the batch goes through the vision tower in one call, and the merged tokens replace the
    embeddings of the <|image_pad|> / <|video_pad|> tokens, in order over the flattened batch.
    Without position_ids, M-RoPE positions are computed from the tokens and grids (model/mrope.py).
    """

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
        self.visual = (VisionEncoder(cfg.vision, cfg.hidden_size, cfg.attn_backend)
                       if cfg.vision is not None else None)
        self.token_ce = TokenCrossEntropy()
        self.num_moe_layers = sum(isinstance(m, TopKRouter) for m in self.modules())
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Every parameter by its rule in model/init.py, as a function of (seed, name, element
        index) only, so a sharded model materialised rank by rank (parallel/materialize.py) gets the
        same weights; then the buffers. seed None: drawn from torch's default generator (a build
        after `torch.manual_seed(s)` is deterministic in s). Also the entry point after `to_empty`."""
        init_model_(self, draw_seed() if seed is None else seed)

    def build_context(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                      cu_seqlens: Optional[torch.Tensor],
                      image_grid_thw: Optional[torch.Tensor] = None,
                      video_grid_thw: Optional[torch.Tensor] = None) -> SequenceContext:
        return build_sequence_context(self.cfg, self.rotary, input_ids, position_ids, cu_seqlens,
                                      image_grid_thw, video_grid_thw)

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: image or video pad tokens (all False for a text-only model)."""
        return visual_token_mask(self.cfg, input_ids)

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_grid_thw: Optional[torch.Tensor] = None,
              pixel_values_videos: Optional[torch.Tensor] = None,
              video_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the merged visual tokens scattered into the pad positions."""
        emb = self.embed_tokens(input_ids)
        if self.visual is None:
            if pixel_values is not None or pixel_values_videos is not None:
                raise ValueError(f"model {self.cfg.name!r} has no vision tower (model.vision is "
                                 f"null) but the batch has pixel_values")
            return emb
        v = self.cfg.vision
        items = []
        for kind, pixels, grid, token_id in (
                ("image", pixel_values, image_grid_thw, v.image_token_id),
                ("video", pixel_values_videos, video_grid_thw, v.video_token_id)):
            if (pixels is None) != (grid is None):
                raise ValueError(f"{kind}s need both pixel values and their grid_thw; got only one")
            check_placeholder_counts(input_ids, grid, token_id, v.spatial_merge_size, kind)
            if pixels is not None and grid.shape[0] > 0:
                items.append((pixels, grid, token_id))
        if not items:
            # Run the tower on nothing all the same: under data parallelism every rank must run the
            # same modules (FSDP gathers the tower's weights collectively), whatever its batch holds.
            empty = self.visual(emb.new_zeros(0, v.patch_dim), input_ids.new_zeros(0, 3))
            return emb + empty.sum().to(emb.dtype)
        # One encoder call for all images and videos of the batch.
        feats = self.visual(torch.cat([p for p, _, _ in items]), torch.cat([g for _, g, _ in items]))
        sizes = [int(g.prod(-1).sum()) // v.merge_unit for _, g, _ in items]
        for part, (_, _, token_id) in zip(feats.split(sizes), items):
            mask = (input_ids == token_id).unsqueeze(-1)
            emb = emb.masked_scatter(mask, part.to(emb.dtype))
        return emb

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                pixel_values_videos: Optional[torch.Tensor] = None,
                video_grid_thw: Optional[torch.Tensor] = None) -> LMOutput:
        # Embed first: its placeholder-count check gives the clearest error for a bad batch.
        emb = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        ctx = self.build_context(input_ids, position_ids, cu_seqlens, image_grid_thw, video_grid_thw)
        h = emb
        for layer in self.layers:
            h = layer(h, ctx)
        if labels is None:
            return LMOutput(logits=self.lm_head(self.norm(h)))
        labels = loss_labels(self.cfg, input_ids, labels)
        mtp_emb = mtp_embeddings(self.embed_tokens, self.cfg, input_ids, labels, emb, len(self.mtp))
        return head_loss(self, h, input_ids, labels, ctx, mtp_emb, self.num_moe_layers)


def build_sequence_context(cfg: ModelConfig, rotary: RotaryEmbedding, input_ids: torch.Tensor,
                           position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                           image_grid_thw: Optional[torch.Tensor] = None,
                           video_grid_thw: Optional[torch.Tensor] = None) -> SequenceContext:
    """The per-forward SequenceContext of input_ids [B, T] (a pipeline stage builds its own)."""
    b, t = input_ids.shape
    if cu_seqlens is None:
        cu_seqlens = default_cu_seqlens(b, t, input_ids.device)
    doc_ids, pos_in_doc = segment_layout(cu_seqlens, b, t)
    if position_ids is None and cfg.vision is not None:
        v = cfg.vision
        position_ids = mrope_position_ids(
            input_ids, image_grid_thw, video_grid_thw, cu_seqlens, image_token_id=v.image_token_id,
            video_token_id=v.video_token_id, spatial_merge_size=v.spatial_merge_size)
    elif position_ids is None:
        position_ids = pos_in_doc
    cos, sin = rotary(position_ids)
    return SequenceContext(cu_seqlens=cu_seqlens, doc_ids=doc_ids, pos_in_doc=pos_in_doc,
                           cos=cos, sin=sin)


def visual_token_mask(cfg: ModelConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: image or video pad tokens (all False for a text-only model)."""
    if cfg.vision is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    v = cfg.vision
    return (input_ids == v.image_token_id) | (input_ids == v.video_token_id)


def loss_labels(cfg: ModelConfig, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] as the loss sees them: with vision, no loss at or onto visual pads."""
    if cfg.vision is None:
        return labels
    v = cfg.vision
    return mask_visual_labels(labels, visual_token_mask(cfg, input_ids),
                              (v.image_token_id, v.video_token_id))


def mtp_embeddings(embed_tokens: nn.Module, cfg: ModelConfig, input_ids: torch.Tensor,
                   labels: torch.Tensor, emb: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The embedding input [B, T, D] of each multi-token-prediction depth k = 1..depth: token i+k
    at position i (for a visual pad, its visual token from `emb` [B, T, D]), token 0 where i+k
    leaves the document. labels: [B, T] as `loss_labels` returns them. Computed where the
    embedding lives (under pipeline parallelism: the first stage, which sends them on)."""
    out = []
    valid = torch.ones_like(labels, dtype=torch.bool)
    visual = visual_token_mask(cfg, input_ids)
    for k in range(1, depth + 1):
        valid = valid & (shift_left(labels, k - 1, -100) != -100)
        ids_k = torch.where(valid, shift_left(input_ids, k, 0), torch.zeros_like(input_ids))
        emb_k = embed_tokens(ids_k)
        if cfg.vision is not None:
            use_visual = (valid & shift_left(visual, k, False)).unsqueeze(-1)
            emb_k = torch.where(use_visual, shift_left(emb, k, 0.0), emb_k)
        out.append(emb_k)
    return out


def head_loss(m: nn.Module, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
              ctx: SequenceContext, mtp_emb: list[torch.Tensor], num_moe_layers: int) -> LMOutput:
    """Final norm, LM head, CE (+ MTP) and the MoE losses: the model's loss from the last hidden
    state h [B, T, D].

    m holds `cfg`, `norm`, `lm_head`, `token_ce` and `mtp` (the model, or its last pipeline
    stage). labels: as `loss_labels` returns them; mtp_emb: from `mtp_embeddings`. The MoE losses
    are ctx's sums (a pipeline stage seeds them with the earlier stages' sums), averaged over all
    `num_moe_layers` of the model.
    """
    cfg = m.cfg
    logits = m.lm_head(m.norm(h))
    if cfg.vision is None:
        ce = mean_over_labels(m.token_ce(logits, labels), labels)
        out = LMOutput(ce=ce, num_tokens=int((labels != -100).sum()))
    else:
        out = multimodal_ce(m.token_ce, logits, labels, visual_token_mask(cfg, input_ids), ctx)
    loss = out.ce
    if len(m.mtp):
        out.mtp_ce = mtp_loss(m, h, labels, ctx, mtp_emb)
        loss = loss + cfg.mtp_loss_coef * out.mtp_ce
    if num_moe_layers:
        aux = ctx.take_aux_losses()  # the context keeps no graph past the forward
        out.moe_aux = aux["moe_aux"] / num_moe_layers
        out.moe_z = aux["moe_z"] / num_moe_layers
        loss = loss + cfg.router_aux_loss_coef * out.moe_aux
        if cfg.router_z_loss_coef > 0:
            loss = loss + cfg.router_z_loss_coef * out.moe_z
    out.loss = loss
    return out


def multimodal_ce(token_ce: nn.Module, logits: torch.Tensor, labels: torch.Tensor,
                  visual: torch.Tensor, ctx: SequenceContext) -> LMOutput:
    """Mean CE (differentiable) plus its detached split into after-vision and text positions.
    logits [B, T, V], labels and visual (pad mask) [B, T]."""
    tok = token_ce(logits, labels)
    valid = labels != -100
    n = int(valid.sum())
    out = LMOutput(ce=tok.sum() / max(n, 1), num_tokens=n)
    with torch.no_grad():
        after = after_vision_mask(visual, ctx.cu_seqlens) & valid
        text = valid & ~after
        out.num_tokens_after_vision, out.num_tokens_text = int(after.sum()), int(text.sum())
        out.ce_after_vision = tok[after].sum() / max(out.num_tokens_after_vision, 1)
        out.ce_text = tok[text].sum() / max(out.num_tokens_text, 1)
    return out


def mtp_loss(m: nn.Module, h: torch.Tensor, labels: torch.Tensor, ctx: SequenceContext,
             mtp_emb: list[torch.Tensor]) -> torch.Tensor:
    """Mean over depths k = 1..D of the CE of predicting token i+k+1 at position i.

    Position i is valid for depth k while i+k lies in the same document, i.e. none of
    labels[i .. i+k-1] is -100; its input is mtp_emb[k-1] (see `mtp_embeddings`). Masked visual
    labels also end the chain: conservative, since those targets are pads anyway.
    m holds `mtp`, `lm_head` and `token_ce`.
    """
    valid = torch.ones_like(labels, dtype=torch.bool)
    total = 0.0
    for k, (block, emb_k) in enumerate(zip(m.mtp, mtp_emb), start=1):
        valid = valid & (shift_left(labels, k - 1, -100) != -100)
        target = torch.where(valid, shift_left(labels, k, -100), torch.full_like(labels, -100))
        h, normed = block(h, emb_k, ctx)
        logits = m.lm_head(normed)
        total = total + mean_over_labels(m.token_ce(logits, target), target)
    return total / len(m.mtp)


def mask_visual_labels(labels: torch.Tensor, visual: torch.Tensor, pad_ids: tuple[int, ...]) -> torch.Tensor:
    """labels [B, T] with -100 where the input is a visual pad (visual [B, T] bool) or the target
    is one (a label in pad_ids): a pad's embedding is an image feature, not a token, and nothing
    should learn to predict a pad."""
    is_pad_target = torch.zeros_like(visual)
    for pad in pad_ids:
        is_pad_target |= labels == pad
    return labels.masked_fill(visual | is_pad_target, -100)


def after_vision_mask(visual: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t has a visual pad at or before it in its own document.

    With labels already shifted, these are the targets conditioned on visual content ("caption"
    tokens): the text after a document's first visual block (including the timestamps and
    vision_start/end tokens of later blocks and the final eos). Everything else is plain text:
    text-only documents and the text of a document before its first image or video.
    """
    b, t = visual.shape
    flat = visual.flatten().long()
    cum = flat.cumsum(0)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = cu_seqlens[:-1].repeat_interleave(lengths, output_size=b * t)
    before = F.pad(cum, (1, 0))[starts]   # pads before the document's first token
    return (cum - before > 0).view(b, t)


def shift_left(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """x[:, i] <- x[:, i + k] along T, filling the last k positions. x: [B, T, ...]."""
    if k == 0:
        return x
    return torch.cat([x[:, k:], torch.full_like(x[:, :k], fill)], dim=1)

