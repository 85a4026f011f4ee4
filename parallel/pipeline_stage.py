"""One pipeline stage of the language model: which decoder layers it runs, what it carries to the
next stage, and the example tensors that give `torch.distributed.pipelining` its static shapes.

A stage is a slice of the model the whole model was built as (same modules, same weights):

    first stage:  embed_tokens (+ the vision tower `visual`) -> layers[a:b]
    middle:       layers[a:b]
    last stage:   layers[a:b] -> norm -> lm_head (+ the MTP blocks) -> the micro-batch loss

The submodules keep the model's attribute names (`layers` is a ModuleDict keyed by the global layer
index), so a stage's parameter names are the full model's: checkpoints stay layout-free.

Only fixed-shape tensors travel between stages, per micro-batch of B rows and T tokens:

    h        [B, T, D]   the residual stream
    aux      [2]         running sums of the MoE losses (moe_aux, moe_z) over the layers so far
                         (MoE models only); its gradient carries the aux loss back to earlier stages
    mtp_emb  [B, T, D]   one per MTP depth: the embedding inputs of multi-token prediction, which
                         need the embedding table; the first stage computes them, the last uses them

Everything else a stage needs (input_ids, labels, position_ids, cu_seqlens, the images) every pp
rank has already: all stages of a pipeline read the same batch, so each micro-batch's fields reach
every stage as keyword arguments, and each stage rebuilds its own SequenceContext from them.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from model.language_model import (Qwen35LM, build_sequence_context, head_loss, loss_labels,
                                  mtp_embeddings, slice_mtp_embeddings, split_micro_batch)

from parallel.spec import QWEN35_SPEC, ModuleSpec, stage_role, top_level_stages

AUX_NAMES = ("moe_aux", "moe_z")


def _absent(part: nn.Module) -> Optional[nn.Module]:
    """What a stage holds for a part held elsewhere: an empty list for a list of blocks."""
    return nn.ModuleList() if isinstance(part, nn.ModuleList) else None


def stage_layer_ranges(counts: list[int]) -> list[tuple[int, int]]:
    """[start, end) of the decoder layers of each stage, from the per-stage layer counts."""
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


class PipelineStageModule(nn.Module):
    """Stage `index` of `num_stages`: decoder layers [start, end) of `model`, plus the embedding
    and vision tower on the first stage and the final norm, LM head and MTP on the last.

    forward(*carried, input_ids, labels, position_ids=None, cu_seqlens=None, pixel_values=None,
    image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
      carried: first stage (input_ids [B, T],); others (h, [aux,] *mtp_emb) from the previous stage
      (h and mtp_emb [1, B*T/cp, D] under context parallelism)
      -> (h, [aux,] *mtp_emb) to the next stage, or on the last stage the micro-batch's loss (a
      scalar, as Qwen35LM.forward's `loss`); its detached parts are appended to `self.records`.
    """

    def __init__(self, model: Qwen35LM, index: int, num_stages: int, start: int, end: int,
                 act_dtype: torch.dtype, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC):
        super().__init__()
        self.cfg = model.cfg
        self.stage_index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.layer_range = (start, end)
        # The stage's parts, by the stage roles of parallel/spec.py.
        for name, _ in model.named_children():
            if stage_role(name, spec) is None:
                raise ValueError(f"top-level module {name!r} has no pipeline stage role in "
                                 f"parallel/spec.py: add a row saying which stages hold it")
        for name, role in top_level_stages(spec):
            part = getattr(model, name, None)
            if role == "layers":
                self.layers = nn.ModuleDict({str(i): part[i] for i in range(start, end)})
            else:
                held = role == "every" or (role == "first" and self.is_first) \
                    or (role == "last" and self.is_last)
                setattr(self, name, part if held or part is None else _absent(part))
        self.num_moe_layers = model.num_moe_layers
        self.mtp_depth = len(model.mtp)
        # Context parallelism: every stage runs this rank's slice of each micro-batch, and the
        # carried tensors are the slice's, [1, B*T/cp, D].
        self.cp_comm = model.cp_comm
        self.act_dtype = act_dtype
        # The MoE losses are summed in at least fp32, as the router computes them.
        self.aux_dtype = torch.promote_types(act_dtype, torch.float32)
        self.records: list[dict[str, torch.Tensor]] = []
        # autocast / FP8 autocast for the forward (the schedule runs the backward itself).
        self.forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def carries_aux(self) -> bool:
        return self.num_moe_layers > 0

    def embed(self, *args, **kwargs) -> torch.Tensor:
        # The model's own embedding step: it reads only embed_tokens, visual and cfg, which the
        # first stage holds under the same names.
        return Qwen35LM.embed(self, *args, **kwargs)

    def forward(self, *carried: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None,
                pixel_values_videos: Optional[torch.Tensor] = None,
                video_grid_thw: Optional[torch.Tensor] = None):
        with self.forward_context():
            part = None
            if self.cp_comm is not None:
                part = split_micro_batch(self.cfg, self.rotary, self.cp_comm, input_ids, position_ids,
                                         cu_seqlens, labels, image_grid_thw, video_grid_thw,
                                         self.mtp_depth)
            if self.is_first:
                emb = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                 video_grid_thw, span=None if part is None else part.span)
            if part is None:
                ctx = build_sequence_context(self.cfg, self.rotary, input_ids, position_ids,
                                             cu_seqlens, image_grid_thw, video_grid_thw)
                labels = loss_labels(self.cfg, input_ids, labels)
            else:
                ctx, input_ids, labels = part.ctx, part.input_ids, part.labels
            if self.is_first and part is not None:
                h = emb[:, :part.length]
                mtp_emb = slice_mtp_embeddings(self.embed_tokens, part, emb)
            elif self.is_first:
                h = emb
                mtp_emb = mtp_embeddings(self.embed_tokens, self.cfg, input_ids, labels, emb,
                                         self.mtp_depth)
            else:
                h, rest = carried[0], list(carried[1:])
                if self.carries_aux:
                    # Seed this forward's sums with the earlier stages': the layers then add to
                    # them in the model's own order, so the sum is the one-process sum.
                    aux = rest.pop(0)
                    for i, name in enumerate(AUX_NAMES):
                        ctx.add_aux_loss(name, aux[i])
                mtp_emb = rest
            for layer in self.layers.values():
                h = layer(h, ctx)
            if self.is_last:
                out = head_loss(self, h, input_ids, labels, ctx, mtp_emb, self.num_moe_layers)
                self._record(out)
                return out.loss
            sent = [h.to(self.act_dtype).contiguous()]
            if self.carries_aux:
                aux = ctx.take_aux_losses()  # the context keeps no graph past the forward
                sums = [aux.get(name) for name in AUX_NAMES]
                sent.append(torch.stack([torch.zeros((), device=h.device) if s is None else s
                                         for s in sums]).to(self.aux_dtype))
            sent += [e.to(self.act_dtype).contiguous() for e in mtp_emb]
            return tuple(sent)

    @torch.no_grad()
    def _record(self, out) -> None:
        rec = {name: getattr(out, name).detach() for name in ("loss", "ce", "mtp_ce", "moe_aux", "moe_z")
               if getattr(out, name) is not None}
        rec["num_tokens"] = torch.tensor(out.num_tokens)
        if out.ce_after_vision is not None:
            rec["ce_after_vision"] = out.ce_after_vision.detach()
            rec["ce_text"] = out.ce_text.detach()
            rec["num_tokens_after_vision"] = torch.tensor(out.num_tokens_after_vision)
            rec["num_tokens_text"] = torch.tensor(out.num_tokens_text)
        self.records.append(rec)

    def example_inputs(self, rows: int, seqlen: int) -> tuple[torch.Tensor, ...]:
        """Meta tensors with the shapes and dtypes of `carried` for micro-batches of [rows, seqlen]."""
        if self.is_first:
            return (torch.empty(rows, seqlen, dtype=torch.long, device="meta"),)
        return _carried_examples(self, *self.carried_shape(rows, seqlen))

    def example_outputs(self, rows: int, seqlen: int) -> tuple[torch.Tensor, ...]:
        if self.is_last:
            return (torch.empty((), dtype=self.aux_dtype, device="meta", requires_grad=True),)
        return _carried_examples(self, *self.carried_shape(rows, seqlen))

    def carried_shape(self, rows: int, seqlen: int) -> tuple[int, int]:
        """[rows, tokens] of the carried tensors: the micro-batch's, or under CP this rank's slice."""
        if self.cp_comm is None:
            return rows, seqlen
        return 1, rows * seqlen // self.cp_comm.size


def _carried_examples(stage: PipelineStageModule, rows: int, seqlen: int) -> tuple[torch.Tensor, ...]:
    d = stage.cfg.hidden_size

    def hidden():
        return torch.empty(rows, seqlen, d, dtype=stage.act_dtype, device="meta", requires_grad=True)

    out = [hidden()]
    if stage.carries_aux:
        out.append(torch.empty(len(AUX_NAMES), dtype=stage.aux_dtype, device="meta", requires_grad=True))
    out += [hidden() for _ in range(stage.mtp_depth)]
    return tuple(out)


class LocalStages(nn.Module):
    """This rank's stages as one module for the optimizer, checkpoints and logging: the same
    submodules under the full model's names (`embed_tokens`, `visual`, `layers.<i>`, `norm`,
    `lm_head`, `mtp`), None where this rank holds no such part. Not callable: the schedule runs
    the stages."""

    def __init__(self, stages: list[PipelineStageModule],
                 spec: tuple[ModuleSpec, ...] = QWEN35_SPEC):
        super().__init__()
        first = next((s for s in stages if s.is_first), None)
        last = next((s for s in stages if s.is_last), None)
        self.cfg = stages[0].cfg
        for name, role in top_level_stages(spec):
            if role == "layers":
                self.layers = nn.ModuleDict({k: m for s in stages for k, m in s.layers.items()})
            elif role in ("first", "last"):  # what the holding stage has, else the absent value
                holder = first if role == "first" else last
                setattr(self, name, getattr(holder if holder is not None else stages[0], name))
            else:  # every stage's (the rotary tables): one object, materialised once for all
                setattr(self, name, getattr(stages[0], name))

    def forward(self, *args, **kwargs):
        raise RuntimeError("under pipeline parallelism the model runs through PipelineRunner.step")
