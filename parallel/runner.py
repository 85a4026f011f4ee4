"""What the trainer drives each step, whatever the layout: a step runner.

    runner = parallelize(model, meshes, pcfg, device, ...)      # parallel/plan.py
    sums, modality = runner.step(micro_batches, total_tokens)   # forward + backward of all of them
    runner.finish_grads(params); norm = runner.grad_norm(params)
    load = runner.collect_expert_load()

`LocalRunner` runs the micro-batches through one model (one process, or one rank of a layout
without pipeline stages); `parallel.pipeline.PipelineRunner` runs them through this rank's stages
by a pipeline schedule. Both accumulate gradients in `runner.model`'s parameters (the full model's
names) and return the same sums, so the trainer has no branch on the layout.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from model.language_model import VISUAL_KEYS
from model.moe import collect_expert_load, update_router_bias
from parallel.distributed import sum_over
from parallel.grads import global_grad_norm, match_grad_placements

LOGGED = ("loss", "ce", "mtp_ce", "moe_aux", "moe_z")
# What LocalRunner.forward_backward keeps of each micro-batch's output for `step` to read.
RECORDED = LOGGED + ("ce_after_vision", "ce_text", "num_tokens_after_vision", "num_tokens_text")


class StepRunner:
    """The interface, and what every layout does alike. `meshes`: parallel.mesh.Meshes, None in
    one process."""

    model: nn.Module

    def __init__(self, model: nn.Module, meshes, device: torch.device):
        self.model, self.meshes, self.device = model, meshes, device
        self.forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def set_forward_context(self, factory: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Context for every forward (autocast, FP8 autocast)."""
        self.forward_context = factory

    def step(self, micro_batches: list[dict], total_tokens: int) -> tuple[dict[str, float], dict[str, list]]:
        """Forward and backward of the micro-batches; each weighted by its share of the global
        batch's `total_tokens` loss tokens. -> (sums[name] = sum of weight x value for the logged
        losses, modality (vision models) = {"ce_after_vision": [CE x tokens, tokens], "ce_text": ...})."""
        raise NotImplementedError

    def forward_backward(self, micro_batches: list[dict], total_tokens: int):
        """`step` without reading its results to the host (the rehearsal runs it on fake tensors)."""
        raise NotImplementedError

    def sum_dp(self, values: list[float]) -> list[float]:
        """Sum over the data-parallel ranks (tensor-parallel ranks hold the same values)."""
        return sum_over(values, self.meshes.loss if self.meshes is not None else None)

    def finish_grads(self, params: list[torch.Tensor]) -> None:
        """Complete the gradients the plans leave partial, before norms and the optimizer."""
        if self.meshes is None:
            return
        from parallel.vision_plan import reduce_vision_grads

        match_grad_placements(params)
        reduce_vision_grads(self.model)  # the balanced plan's ViT grads are partial over tp

    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The global gradient norm of `params` (every mesh, every stage), equal on all ranks."""
        return global_grad_norm(params)

    def collect_expert_load(self) -> Optional[torch.Tensor]:
        """[num_moe_layers, E] token counts of this rank's micro-batches since the last call
        (under CP, of the whole micro-batches: the slices' counts summed over the cp group)."""
        load = collect_expert_load(self.model)
        if load is None or self.meshes is None or self.meshes.cp is None:
            return load
        from parallel.context_parallel import sum_over_cp

        return sum_over_cp(load, self.meshes.cp)

    def update_router_bias(self, load: torch.Tensor, rate: float) -> None:
        update_router_bias(self.model, load, rate)

    def dropped_tokens(self) -> Optional[int]:
        """Token copies dropped by the EP capacity since the last call, summed over the dp ranks."""
        if self.meshes is None or self.meshes.ep is None:
            return None
        from parallel.expert_parallel import collect_dropped_tokens

        dropped = collect_dropped_tokens(self.model)
        return None if dropped is None else int(self.sum_dp([float(dropped.sum())])[0])


class LocalRunner(StepRunner):
    """The micro-batches one after the other through the whole model (gradient accumulation)."""

    def forward_backward(self, micro_batches: list[dict], total_tokens: int) -> list[tuple[float, dict]]:
        """Forward and backward of the micro-batches without reading a value to the host (the
        rehearsal runs it on fake tensors). -> per micro-batch (weight, {name: detached value or
        token count}) for `step` to read."""
        records = []
        fsdp = hasattr(self.model, "set_requires_gradient_sync")
        for i, b in enumerate(micro_batches):
            if fsdp:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            # Token-weighted so that accumulation (and data parallelism) equals one large batch.
            weight = b["num_tokens"] / total_tokens
            visual = {k: b[k].to(self.device) for k in VISUAL_KEYS if b.get(k) is not None}
            with self.forward_context():
                out = self.model(b["input_ids"].to(self.device),
                                 position_ids=None if b.get("position_ids") is None  # M-RoPE
                                 else b["position_ids"].to(self.device),                # from grids
                                 cu_seqlens=b["cu_seqlens"].to(self.device),
                                 labels=b["labels"].to(self.device), **visual)
            (out.loss * weight).backward()
            records.append((weight, {n: v.detach() if isinstance(v, torch.Tensor) else v
                                     for n in RECORDED if (v := getattr(out, n)) is not None}))
        return records

    def step(self, micro_batches: list[dict], total_tokens: int) -> tuple[dict[str, float], dict[str, list]]:
        sums: dict[str, float] = {}
        modality = {"ce_after_vision": [0.0, 0], "ce_text": [0.0, 0]}  # [CE x tokens, tokens]
        for weight, rec in self.forward_backward(micro_batches, total_tokens):
            for name in LOGGED:
                if name in rec:
                    sums[name] = sums.get(name, 0.0) + weight * rec[name].float().item()
            for name, n in (("ce_after_vision", rec.get("num_tokens_after_vision")),
                            ("ce_text", rec.get("num_tokens_text"))):
                if name in rec and n:
                    modality[name][0] += rec[name].float().item() * n
                    modality[name][1] += n
        return sums, modality
