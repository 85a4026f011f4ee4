"""Applies the parallel plans to a model built whole on every rank (same seed, same weights):
expert parallelism, tensor + sequence parallelism, the vision plan, activation checkpointing,
then FSDP2 over the data-parallel ranks (the order torchtitan uses: TP/EP, then AC, then FSDP)."""

from __future__ import annotations

from typing import Optional

import torch

from model.language_model import Qwen35LM
from parallel.activation_checkpoint import ContextFn, apply_activation_checkpoint
from parallel.config import ParallelConfig
from parallel.fsdp import apply_fsdp


def fsdp_param_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """parallel.param_dtype -> the FSDP2 compute dtype (None: keep the parameters' own dtype)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def apply_module_plans(model: Qwen35LM, meshes, pcfg: ParallelConfig,
                       ac_context_fn: Optional[ContextFn] = None) -> None:
    """The plans that work per module on the whole model: EP, TP + SP, the vision plan and
    activation checkpointing (by global layer index; `ac_context_fn`: the FP8 backend's
    checkpoint contexts). FSDP (or the pipeline cut) comes after."""
    if meshes.ep is not None:
        from parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, meshes.ep, pcfg.expert_capacity_factor)
    if meshes.tp is not None:
        from parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, meshes.tp)
    if model.visual is not None and meshes.vision is not None:
        from parallel.vision_plan import apply_vision_plan

        apply_vision_plan(model, meshes.vision, pcfg.vision.name)
    apply_activation_checkpoint(model.layers, pcfg.activation_checkpoint, pcfg.selective_ac_every,
                                ac_context_fn)


def parallelize(model: Qwen35LM, meshes, pcfg: ParallelConfig, device: torch.device,
                ac_context_fn: Optional[ContextFn] = None) -> Qwen35LM:
    """`meshes` is parallel.mesh.Meshes (tp, ep, vision, fsdp, expert_fsdp, dp_size)."""
    apply_module_plans(model, meshes, pcfg, ac_context_fn)
    if meshes.fsdp is not None and meshes.fsdp.size() > 1:
        apply_fsdp(model, meshes.fsdp, param_dtype=fsdp_param_dtype(pcfg.param_dtype, device),
                   reshard_after_forward=pcfg.reshard_after_forward,
                   expert_mesh=meshes.expert_fsdp)
    return model
