"""The hybrid Gated DeltaNet / gated-attention / MoE causal language model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.context import SequenceContext, segment_layout
from model.context_parallel import CPComm, CPSlice, flat_slice, local_cu_seqlens, report, slice_range
from model.decoder import DecoderLayer, MTPBlock
from model.init import draw_seed, init_model_
from model.loss import TokenCrossEntropy
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
        # Context parallelism (parallel/context_parallel.py sets it): the CP group's collectives;
        # each forward then runs this rank's slice of the micro-batch (model/context_parallel.py).
        self.cp_comm: Optional[CPComm] = None
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
              video_grid_thw: Optional[torch.Tensor] = None,
              span: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the merged visual tokens scattered into the pad positions.
        span (context parallelism): only the tokens [start, end) of the flattened stream, [1, L, D]
        (zeros past its end); every image is still encoded, its tokens scattered where they fall."""
        ids = input_ids if span is None else flat_slice(input_ids, *span)
        emb = self.embed_tokens(ids)
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
            mask = input_ids == token_id
            if span is not None:  # the visual tokens of this slice: those after the earlier pads
                before = int(mask.flatten()[:span[0]].sum())
                mask = flat_slice(mask, *span, fill=False)
                part = part[before: before + int(mask.sum())]
            emb = emb.masked_scatter(mask.unsqueeze(-1), part.to(emb.dtype))
        return emb

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                pixel_values_videos: Optional[torch.Tensor] = None,
                video_grid_thw: Optional[torch.Tensor] = None) -> LMOutput:
        if self.cp_comm is not None:
            return self.forward_slice(input_ids, position_ids, cu_seqlens, labels, pixel_values,
                                      image_grid_thw, pixel_values_videos, video_grid_thw)
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

    def forward_slice(self, input_ids, position_ids, cu_seqlens, labels, pixel_values,
                      image_grid_thw, pixel_values_videos, video_grid_thw) -> LMOutput:
        """Context parallelism: the same arguments (the whole micro-batch, on every rank of the CP
        group), computed on this rank's slice; the loss values are the whole micro-batch's, the
        gradients this rank's share. Without labels: the logits of the slice, [1, L, V]."""
        part = split_micro_batch(self.cfg, self.rotary, self.cp_comm, input_ids, position_ids,
                                 cu_seqlens, labels, image_grid_thw, video_grid_thw, len(self.mtp))
        emb = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                         video_grid_thw, span=part.span)
        h = emb[:, :part.length]
        for layer in self.layers:
            h = layer(h, part.ctx)
        if labels is None:
            return LMOutput(logits=self.lm_head(self.norm(h)))
        mtp_emb = slice_mtp_embeddings(self.embed_tokens, part, emb)
        return head_loss(self, h, part.input_ids, part.labels, part.ctx, mtp_emb, self.num_moe_layers)


@dataclass
class MicroBatchSlice:
    """One rank's part of a micro-batch under context parallelism (see `split_micro_batch`).
    input_ids, labels (as `loss_labels` returns them): [1, L]; span: the tokens to embed, the
    slice plus the MTP depth's lookahead; mtp: per depth (ids_k, use_visual_k), [1, L] each."""

    ctx: SequenceContext
    input_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    span: tuple[int, int]
    mtp: list

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def split_micro_batch(cfg: ModelConfig, rotary: RotaryEmbedding, comm: CPComm,
                      input_ids: torch.Tensor, position_ids: Optional[torch.Tensor],
                      cu_seqlens: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                      image_grid_thw: Optional[torch.Tensor] = None,
                      video_grid_thw: Optional[torch.Tensor] = None,
                      mtp_depth: int = 0) -> MicroBatchSlice:
    """This CP rank's slice of a micro-batch input_ids [B, T] (model/context_parallel.py): what
    crosses the slice's edges (document layout, M-RoPE positions, shifted MTP targets, the
    after-vision split) is computed on the whole micro-batch first, then sliced."""
    b, t = input_ids.shape
    if cu_seqlens is None:
        cu_seqlens = default_cu_seqlens(b, t, input_ids.device)
    start, end = slice_range(b * t, comm.rank, comm.size)
    all_doc_ids, all_pos = segment_layout(cu_seqlens, b, t)  # the whole micro-batch's numbering
    doc_ids, pos_in_doc = flat_slice(all_doc_ids, start, end), flat_slice(all_pos, start, end)
    if position_ids is None:
        position_ids = full_position_ids(cfg, input_ids, cu_seqlens, image_grid_thw, video_grid_thw,
                                         all_pos)
    if position_ids.dim() == 3:  # [3, B, T] -> [3, 1, L]
        pos = position_ids.reshape(3, 1, -1)[:, :, start:end]
    else:
        pos = flat_slice(position_ids, start, end)
    cos, sin = rotary(pos)
    cp = CPSlice(comm=comm, start=start, end=end, total=b * t, cu_seqlens=cu_seqlens,
                 continues=bool(pos_in_doc[0, 0] > 0))  # read once here, not in every GDN layer
    local_labels, mtp = None, []
    if labels is not None:
        labels = loss_labels(cfg, input_ids, labels)
        local_labels = flat_slice(labels, start, end)
        cp.mtp_targets = [flat_slice(x, start, end) for x in shift_targets(labels, mtp_depth)]
        mtp = [(flat_slice(i, start, end), flat_slice(v, start, end))
               for i, v in mtp_sources(cfg, input_ids, labels, mtp_depth)]
        if cfg.vision is not None:
            cp.after_vision = flat_slice(after_vision_mask(visual_token_mask(cfg, input_ids), cu_seqlens),
                                         start, end)
    ctx = SequenceContext(cu_seqlens=local_cu_seqlens(cu_seqlens, start, end), doc_ids=doc_ids,
                          pos_in_doc=pos_in_doc, cos=cos, sin=sin, cp=cp, key_bounds=cu_seqlens.tolist())
    return MicroBatchSlice(ctx=ctx, input_ids=flat_slice(input_ids, start, end), labels=local_labels,
                           span=(start, end + mtp_depth), mtp=mtp)


def slice_mtp_embeddings(embed_tokens: nn.Module, part: MicroBatchSlice, emb: torch.Tensor
                         ) -> list[torch.Tensor]:
    """`mtp_embeddings` of a slice: emb [1, L + depth, D] holds the slice's embeddings and the
    lookahead's, where the visual tokens at i + k come from."""
    out = []
    for k, (ids_k, use_visual) in enumerate(part.mtp, start=1):
        emb_k = embed_tokens(ids_k)
        out.append(torch.where(use_visual.unsqueeze(-1), emb[:, k:k + part.length], emb_k))
    return out


def full_position_ids(cfg: ModelConfig, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                      image_grid_thw: Optional[torch.Tensor], video_grid_thw: Optional[torch.Tensor],
                      pos_in_doc: torch.Tensor) -> torch.Tensor:
    """The positions a batch without position_ids gets: M-RoPE (t, h, w) [3, B, T] from the tokens
    and grids with vision, else the position in the document, pos_in_doc [B, T] itself."""
    if cfg.vision is not None:
        v = cfg.vision
        return mrope_position_ids(
            input_ids, image_grid_thw, video_grid_thw, cu_seqlens, image_token_id=v.image_token_id,
            video_token_id=v.video_token_id, spatial_merge_size=v.spatial_merge_size)
    return pos_in_doc


def build_sequence_context(cfg: ModelConfig, rotary: RotaryEmbedding, input_ids: torch.Tensor,
                           position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                           image_grid_thw: Optional[torch.Tensor] = None,
                           video_grid_thw: Optional[torch.Tensor] = None) -> SequenceContext:
    """The per-forward SequenceContext of input_ids [B, T] (a pipeline stage builds its own)."""
    b, t = input_ids.shape
    if cu_seqlens is None:
        cu_seqlens = default_cu_seqlens(b, t, input_ids.device)
    doc_ids, pos_in_doc = segment_layout(cu_seqlens, b, t)
    if position_ids is None:
        position_ids = full_position_ids(cfg, input_ids, cu_seqlens, image_grid_thw, video_grid_thw,
                                         pos_in_doc)
    cos, sin = rotary(position_ids)
    return SequenceContext(cu_seqlens=cu_seqlens, doc_ids=doc_ids, pos_in_doc=pos_in_doc,
                           cos=cos, sin=sin, key_bounds=cu_seqlens.tolist())


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
    for k, (ids_k, use_visual) in enumerate(mtp_sources(cfg, input_ids, labels, depth), start=1):
        emb_k = embed_tokens(ids_k)
        if cfg.vision is not None:
            emb_k = torch.where(use_visual.unsqueeze(-1), shift_left(emb, k, 0.0), emb_k)
        out.append(emb_k)
    return out


def shift_targets(labels: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Per MTP depth k = 1..depth the target of position i, labels [B, T] -> [B, T] each: label
    i+k while positions i..i+k-1 all have a label (the chain stays in the document), else -100."""
    out, valid = [], torch.ones_like(labels, dtype=torch.bool)
    for k in range(1, depth + 1):
        valid = valid & (shift_left(labels, k - 1, -100) != -100)
        out.append(torch.where(valid, shift_left(labels, k, -100), torch.full_like(labels, -100)))
    return out


def mtp_sources(cfg, input_ids: torch.Tensor, labels: torch.Tensor, depth: int
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MTP depth k, (ids_k, use_visual_k) over [B, T]: the token id whose embedding position i
    takes (0 where i+k leaves the document), and where it is instead the visual token at i+k (as
    `mtp_embeddings` computes them)."""
    out, valid = [], torch.ones_like(labels, dtype=torch.bool)
    visual = visual_token_mask(cfg, input_ids)
    for k in range(1, depth + 1):
        valid = valid & (shift_left(labels, k - 1, -100) != -100)
        ids_k = torch.where(valid, shift_left(input_ids, k, 0), torch.zeros_like(input_ids))
        out.append((ids_k, valid & shift_left(visual, k, False)))
    return out


def head_loss(m: nn.Module, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
              ctx: SequenceContext, mtp_emb: list[torch.Tensor], num_moe_layers: int) -> LMOutput:
    """Final norm, LM head, CE (+ MTP) and the MoE losses: the model's loss from the last hidden
    state h [B, T, D].

    m holds `cfg`, `norm`, `lm_head`, `token_ce` and `mtp` (the model, or its last pipeline
    stage). labels: as `loss_labels` returns them; mtp_emb: from `mtp_embeddings`. The MoE losses
    are ctx's sums (a pipeline stage seeds them with the earlier stages' sums), averaged over all
    `num_moe_layers` of the model. Under context parallelism (ctx.cp) every mean divides by the
    whole micro-batch's count, so the ranks' losses are shares that add up to one process's; the
    returned values are those sums (see model/context_parallel.py).
    """
    cfg, cp = m.cfg, ctx.cp
    logits = m.lm_head(m.norm(h))
    tok = m.token_ce(logits, labels)
    valid = labels != -100
    targets = shift_targets(labels, len(m.mtp)) if cp is None else cp.mtp_targets
    after = None
    if cfg.vision is not None:
        after = (after_vision_mask(visual_token_mask(cfg, input_ids), ctx.cu_seqlens)
                 if cp is None else cp.after_vision) & valid
    # Every count the means divide by, over the whole micro-batch: one reduction under CP.
    counts = [valid.sum()] + [(t != -100).sum() for t in targets]
    if after is not None:
        counts += [after.sum(), (valid & ~after).sum()]
    counts = torch.stack(counts)
    if cp is not None:
        counts = cp.all_reduce(counts)
    counts = counts.tolist()
    out = LMOutput(ce=tok.sum() / max(counts[0], 1), num_tokens=counts[0])
    if after is not None:
        out.num_tokens_after_vision, out.num_tokens_text = counts[-2], counts[-1]
        with torch.no_grad():
            out.ce_after_vision = tok[after].sum() / max(counts[-2], 1)
            out.ce_text = tok[valid & ~after].sum() / max(counts[-1], 1)
    loss = out.ce
    if len(m.mtp):
        out.mtp_ce = mtp_loss(m, h, targets, counts[1:1 + len(m.mtp)], ctx, mtp_emb)
        loss = loss + cfg.mtp_loss_coef * out.mtp_ce
    if num_moe_layers:
        aux = ctx.take_aux_losses()  # the context keeps no graph past the forward
        out.moe_aux = aux["moe_aux"] / num_moe_layers
        out.moe_z = aux["moe_z"] / num_moe_layers
        loss = loss + cfg.router_aux_loss_coef * out.moe_aux
        if cfg.router_z_loss_coef > 0:
            loss = loss + cfg.router_z_loss_coef * out.moe_z
    out.loss = loss
    if cp is not None:
        names = ("loss", "ce", "mtp_ce", "moe_aux", "moe_z", "ce_after_vision", "ce_text")
        for name, value in report(cp, {n: getattr(out, n) for n in names}).items():
            setattr(out, name, value)
    return out


def mtp_loss(m: nn.Module, h: torch.Tensor, targets: list[torch.Tensor], counts: list[int],
             ctx: SequenceContext, mtp_emb: list[torch.Tensor]) -> torch.Tensor:
    """Mean over depths k = 1..D of the CE of predicting token i+k+1 at position i.

    targets[k-1] [B, T]: that token's label where position i is valid for depth k (i+k in the same
    document: none of labels[i .. i+k-1] is -100), else -100 (`shift_targets`); counts[k-1]: the
    number of such targets (over the whole micro-batch under CP). Its input is mtp_emb[k-1] (see
    `mtp_embeddings`). Masked visual labels also end the chain: conservative, since those targets
    are pads anyway. m holds `mtp`, `lm_head` and `token_ce`.
    """
    total = 0.0
    for block, emb_k, target, n in zip(m.mtp, mtp_emb, targets, counts):
        h, normed = block(h, emb_k, ctx)
        logits = m.lm_head(normed)
        total = total + m.token_ce(logits, target).sum() / max(n, 1)
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

