"""Materialise a model built on the meta device and sharded by the plans: allocate each rank's
shards (`to_empty`) and fill them with the layout-independent init of model/init.py, so every
layout starts from the weights one process would build with the same seed.

    with torch.device("meta"):
        model = Qwen35LM(cfg)
    parallelize(model, meshes, pcfg, device)          # TP / EP / FSDP2 / pipeline stages
    materialize(model, device, seed)

A parameter's local shard is located from its DTensor placements, as DTensor defines them (left to
right over the mesh dims): `Shard(d)` takes this coordinate's torch.chunk piece of dim d (pieces may
be uneven or empty), `_StridedShard(d, sf)` (FSDP2 over a dim already sharded by TP/EP on a 2-D
mesh) splits dim d into sf pieces first and takes this coordinate's chunk of each, `Replicate` and
`Partial` keep the dim whole. FSDP2 stores a padded shard; its DTensor's local tensor is the unpadded
view into that storage, which is what gets filled.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from model.init import canonical_name, fill_region_, full_index, param_rules, reset_buffers


def chunk_indices(idx: torch.Tensor, num_chunks: int, i: int) -> torch.Tensor:
    """Piece i of torch.chunk(idx, num_chunks) (empty where torch.chunk returns fewer pieces)."""
    size = -(-len(idx) // num_chunks)
    return idx[min(i * size, len(idx)):min((i + 1) * size, len(idx))]


def shard_indices(idx: torch.Tensor, placement, num_chunks: int, coord: int) -> torch.Tensor:
    """The global indices (along the placement's dim) that mesh coordinate `coord` keeps of `idx`."""
    if isinstance(placement, _StridedShard):
        sf = placement._split_factor_int()
        return torch.cat([chunk_indices(chunk_indices(idx, sf, j), num_chunks, coord) for j in range(sf)])
    return chunk_indices(idx, num_chunks, coord)


def local_index(param: torch.Tensor, device) -> Optional[list[torch.Tensor]]:
    """The global index vectors [per dim] of this rank's local tensor of `param`; None when this
    rank holds no part of it (not in the DTensor's mesh)."""
    shape = tuple(param.shape)
    idx = full_index(shape, device)
    if not isinstance(param, DTensor):
        return idx
    mesh = param.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        return None
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            d = placement.dim % len(shape)
            idx[d] = shard_indices(idx[d], placement, mesh.size(mesh_dim), coord[mesh_dim])
    return idx


def _aliases(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """Tied parameters: (module, attr) pairs that hold the same Parameter as an earlier (module,
    attr); `to_empty` gives each its own tensor, so they are re-tied afterwards."""
    first: dict[int, tuple[nn.Module, str]] = {}
    out = []
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is None:
                continue
            if id(p) in first:
                out.append((m, attr, *first[id(p)]))
            else:
                first[id(p)] = (m, attr)
    return out


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, seed: int,
                initializer_range: Optional[float] = None, values: bool = True) -> nn.Module:
    """`model.to_empty(device)` (after the plans: FSDP2 re-registers its padded shards there), then
    every parameter's local shard filled in place from (seed, full parameter name, global index),
    then the buffers. Parameter names are the unparallelised model's (FSDP2, parallelize_module and
    the pipeline stages keep them). values=False allocates only: the rehearsal's fake tensors
    (parallel/rehearse.py) hold no values to fill. Returns `model`."""
    rules = param_rules(model, initializer_range)
    tied = _aliases(model)
    model.to_empty(device=device)
    for m, attr, src, src_attr in tied:
        setattr(m, attr, getattr(src, src_attr))
    if not values:
        return model
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        idx = local_index(p, local.device)
        if idx is None:
            continue
        if tuple(len(i) for i in idx) != tuple(local.shape):
            raise RuntimeError(f"{name}: local shard {tuple(local.shape)} is not the region "
                               f"{tuple(len(i) for i in idx)} its placements {p.placements} describe")
        fill_region_(local, rules[name], seed, canonical_name(name), p.shape, idx)
    reset_all_buffers(model)
    return model


@torch.no_grad()
def reset_all_buffers(model: nn.Module) -> None:
    """The model's buffers (rotary tables, router counters) and the state of modules swapped in
    from outside the model (the FP8 backends), after `to_empty` left them uninitialised."""
    reset_buffers(model)
    for m in model.modules():
        if callable(getattr(m, "reset_buffers", None)):
            m.reset_buffers()
