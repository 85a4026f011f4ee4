"""FSDP2 (`fully_shard`) over the data-parallel mesh: one unit per decoder layer, per MTP block, the
vision encoder as its own unit, the routed experts as their own unit over the expert-data-parallel
mesh when experts are spread by EP, and the root (embedding, final norm, LM head).

Mixed precision: parameters are gathered in `param_dtype` for compute; gradients are reduced in
fp32 and the sharded fp32 parameters are what the optimizer updates (the master weights).

Gradients are SUMMED over the data-parallel ranks, not averaged: each rank weights its loss by its
share of the global batch's loss tokens (the trainer does), so the sum is the gradient of the
global token mean, also when ranks hold different token counts. The same rule serves the experts
under EP, whose gradients already add up the EP group's tokens in the all-to-all's backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.language_model import Qwen35LM
from model.moe import SparseMoE


def apply_fsdp(model: Qwen35LM, mesh: DeviceMesh, *, param_dtype: Optional[torch.dtype],
               reshard_after_forward: bool = True,
               expert_mesh: Optional[DeviceMesh] = None) -> Qwen35LM:
    """Shard `model` in place. mesh: 1-D (dp_shard) or 2-D (dp_replicate, dp_shard) for HSDP.
    expert_mesh: under EP, the mesh of the ranks holding the same experts (FSDP shards them there)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                              reduce_dtype=torch.float32 if param_dtype is not None else None)
    kw = {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    units = []
    if model.visual is not None:
        units.append(fully_shard(model.visual, **kw))
    for block in [*model.layers, *(m.layer for m in model.mtp)]:
        if expert_mesh is not None and isinstance(block.mlp, SparseMoE):
            units.append(fully_shard(block.mlp.experts, **{**kw, "mesh": expert_mesh}))
    units += [fully_shard(unit, **kw) for unit in [*model.layers, *model.mtp]]
    # The last layers are needed again at the start of backward: keep them gathered.
    units.append(fully_shard(model, **{**kw, "reshard_after_forward": False}))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum: the losses carry the global-batch weights
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model
