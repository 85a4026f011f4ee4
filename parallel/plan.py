"""`parallelize`: the one place that applies the parallel plans, in this order, to a model built
on the meta device (or whole, for tests), for every layout:

  0. (the caller) the FP8 policy's module swaps (train/fp8_policy.py): they replace modules the
     plans then shard, so they come first;
  1. expert parallelism: routed experts sharded over ep, the all-to-all dispatcher swapped in;
  2. tensor + sequence parallelism by the TP roles of parallel/spec.py (head counts per rank, the
     vocab-parallel CE swapped in);
  3. the vision plan (the encoder's class gains the balanced forward);
  3b. context parallelism: the model's CP seam gets the cp group's collectives;
  4. activation checkpointing per decoder layer (by global layer index);
  5. under pp > 1: the cut into this rank's stages by the spec's stage roles, with TP hooks at the
     new stage boundaries;
  6. FSDP2 by the spec's FSDP units (each pipeline stage its own root);
and returns the step runner the trainer drives (parallel/runner.py). The order is torchtitan's:
TP/EP, then AC, then FSDP. Which module gets what is the spec's, not this file's.
"""

from __future__ import annotations

from typing import Optional

import torch

from model.language_model import Qwen35LM
from parallel.activation_checkpoint import ContextFn, apply_activation_checkpoint
from parallel.config import ParallelConfig
from parallel.fsdp import apply_fsdp
from parallel.runner import LocalRunner, StepRunner
from parallel.spec import QWEN35_SPEC, ModuleSpec


def fsdp_param_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """parallel.param_dtype -> the FSDP2 compute dtype (None: keep the parameters' own dtype)."""
    if name == "bf16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def apply_module_plans(model: Qwen35LM, meshes, pcfg: ParallelConfig,
                       ac_context_fn: Optional[ContextFn] = None,
                       spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> None:
    """Steps 1-4, which work per module on the whole model (the stages inherit them).
    `ac_context_fn`: the FP8 backend's checkpoint contexts."""
    if meshes.ep is not None:
        from parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, meshes.ep, pcfg.expert_capacity_factor, spec)
    if meshes.tp is not None:
        from parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, meshes.tp, spec)
    if model.visual is not None and meshes.vision is not None:
        from parallel.vision_plan import apply_vision_plan

        apply_vision_plan(model, meshes.vision, pcfg.vision.name)
    if meshes.cp is not None:
        from parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, meshes.cp)
    apply_activation_checkpoint(model.layers, pcfg.activation_checkpoint, pcfg.selective_ac_every,
                                ac_context_fn)


def parallelize(model: Qwen35LM, meshes, pcfg: ParallelConfig, device: torch.device,
                ac_context_fn: Optional[ContextFn] = None, num_microbatches: Optional[int] = None,
                spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> StepRunner:
    """Apply the plans of `meshes` (parallel.mesh.Meshes; None: one process, where only
    activation checkpointing applies) to `model` in place and return its step runner, whose
    `.model` holds this rank's parameters under the full model's names. `num_microbatches`: per
    step, for the pipeline schedule (pp > 1)."""
    if meshes is None:
        apply_activation_checkpoint(model.layers, pcfg.activation_checkpoint,
                                    pcfg.selective_ac_every, ac_context_fn)
        return LocalRunner(model, None, device)
    if meshes.pp is not None:
        from parallel.pipeline import build_pipeline

        return build_pipeline(model, meshes, pcfg, device, num_microbatches, ac_context_fn, spec)
    apply_module_plans(model, meshes, pcfg, ac_context_fn, spec)
    if meshes.fsdp is not None and meshes.fsdp.size() > 1:
        apply_fsdp(model, meshes.fsdp, param_dtype=fsdp_param_dtype(pcfg.param_dtype, device),
                   reshard_after_forward=pcfg.reshard_after_forward,
                   expert_mesh=meshes.expert_fsdp, spec=spec)
    return LocalRunner(model, meshes, device)
