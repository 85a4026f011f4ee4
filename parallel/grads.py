"""Gradients after backward: placements brought back to the parameters', and the global norm and
clipping over parameters that may be plain tensors or DTensors on different meshes (FSDP, TP, EP)."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from parallel import collectives


@torch.no_grad()
def match_grad_placements(params: Iterable[torch.Tensor]) -> None:
    """Bring each DTensor gradient to its parameter's placements. Autograd can leave a replicated
    parameter's gradient as a partial sum (a sequence-parallel norm) or a sharded parameter's as a
    replicated full tensor (the vocab-parallel embedding); the optimizer and the norm need the
    parameter's own layout. FSDP2 does this itself for the parameters it manages."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


@torch.no_grad()
def grad_square_sum(params: Iterable[torch.Tensor]) -> float:
    """The sum of squares of all gradients, in fp64, whatever their sharding. A DTensor gradient's
    local squared norm is summed over every dimension of its mesh and divided by the number of
    copies (the product of its non-sharded dimensions' sizes), which counts each element once for
    any mix of Shard, _StridedShard and Replicate. Equal on all ranks of those meshes."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            copies = 1
            for size, pl in zip(g.device_mesh.shape, g.placements):
                copies *= 1 if (pl.is_shard() or isinstance(pl, _StridedShard)) else size
            groups[(g.device_mesh, copies)].append(g.to_local())
        else:
            groups[(None, 1)].append(g)
    total = 0.0
    for (mesh, copies), grads in groups.items():
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).square().sum()
        if mesh is not None:
            names = mesh.mesh_dim_names or tuple(f"dim {d}" for d in range(mesh.ndim))
            for d in range(mesh.ndim):
                collectives.all_reduce(sq, f"grad-norm all_reduce over {names[d]}", mesh.get_group(d))
        total += float(sq) / copies
    return total


@torch.no_grad()
def global_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients as one vector (see grad_square_sum): an fp32 scalar."""
    return torch.tensor(grad_square_sum(params), dtype=torch.float64).sqrt().float()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float,
                    norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most max_norm; returns the norm before."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params) if norm is None else norm
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1:
        for p in params:
            p.grad.mul_(scale)
    return norm
