"""FSDP2 (`fully_shard`) over the data-parallel mesh, units as parallel/spec.py states them: one per
decoder layer, per MTP block, the vision encoder, the routed experts over the expert-data-parallel
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
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from parallel.spec import QWEN35_SPEC, ModuleSpec, fsdp_role


def fsdp_units(root: nn.Module, spec: tuple[ModuleSpec, ...] = QWEN35_SPEC,
               experts_apart: bool = False) -> list[tuple[str, nn.Module, str]]:
    """(name, module, role) of the FSDP units under `root` by the spec's `fsdp` roles, innermost
    first (fully_shard wraps children before their parents); the root unit is not listed.
    experts_apart: under EP the routed experts are units of their own (role `expert_unit`)."""
    units = []
    for name, m in root.named_modules():
        role = fsdp_role(name, m, spec) if name else None
        if role == "unit" or (role == "expert_unit" and experts_apart):
            units.append((name, m, role))
    units.sort(key=lambda u: u[2] != "expert_unit")  # stable: experts first, then model order
    return units


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: Optional[torch.dtype],
               reshard_after_forward: bool = True, expert_mesh: Optional[DeviceMesh] = None,
               spec: tuple[ModuleSpec, ...] = QWEN35_SPEC, cast_root_inputs: bool = True) -> nn.Module:
    """Shard `model` (the model, or one pipeline stage) in place. mesh: 1-D (dp_shard) or 2-D
    (dp_replicate, dp_shard) for HSDP. expert_mesh: under EP, the mesh of the ranks holding the
    same experts (FSDP shards them there). cast_root_inputs=False: a pipeline stage's carried MoE
    loss sums stay fp32 under a bf16 policy (the layers cast the hidden state themselves)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                              reduce_dtype=torch.float32 if param_dtype is not None else None)
    kw = {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    units = []
    for _, m, role in fsdp_units(model, spec, experts_apart=expert_mesh is not None):
        units.append(fully_shard(m, **{**kw, "mesh": expert_mesh} if role == "expert_unit" else kw))
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=mp.reduce_dtype,
                                   cast_forward_inputs=cast_root_inputs)
    # The last layers are needed again at the start of backward: keep the root gathered.
    units.append(fully_shard(model, **{**kw, "mp_policy": root_mp, "reshard_after_forward": False}))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum: the losses carry the global-batch weights
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return model
