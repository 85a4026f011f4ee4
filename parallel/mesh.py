"""Device meshes of the language and vision plans, built from a validated `Layout`.

One world DeviceMesh in Megatron's rank order (pp, dp_replicate, dp_shard, cp, tp; tp fastest), with
dp_shard split into (dp_shard_mod_ep, dp_shard_in_ep) when ep > 1 as torchtitan's ParallelDims does.
Every other mesh is a slice of it, or a `_flatten` of a slice, so all share one root mesh (FSDP2
needs the DP mesh and a DTensor parameter's TP/EP mesh to come from the same root).

Axes of size 1 are left out of the world mesh (each would cost a process group per rank), except
the dp_shard axis (dp_shard_mod_ep under EP), which FSDP2 always needs as its shard dimension.

    layout = validate_layout(cfg.parallel, cfg.model, world_size, cfg.data.seq_len)  # no groups yet
    dist.init_process_group(...)
    meshes = build_meshes(layout, device_type)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.layout import Layout, layout_table, validate_layout

__all__ = ["Layout", "Meshes", "build_meshes", "layout_table", "validate_layout"]


@dataclass
class Meshes:
    """The meshes each plan applies itself over; None where the dimension has size 1."""

    layout: Layout
    world: DeviceMesh
    # FSDP2's mesh for non-expert parameters: 1-D (dp_shard x cp), or 2-D (dp_replicate, dp_shard x cp)
    # under HSDP. Always present (size 1 when there is no data parallelism).
    fsdp: DeviceMesh
    tp: DeviceMesh | None
    ep: DeviceMesh | None            # 1-D, the dp_shard_in_ep x cp ranks
    # FSDP2's mesh for routed-expert parameters under EP: dp_shard_mod_ep (2-D with dp_replicate
    # under HSDP). None when ep == 1: experts are then sharded over `fsdp` like everything else.
    expert_fsdp: DeviceMesh | None
    # The group the balanced vision plan splits a micro-batch's images over: the TP group (every
    # cp rank encodes the micro-batch's images, then keeps the visual tokens of its slice).
    vision: DeviceMesh | None
    # Where per-rank loss values are summed for logging: the dp ranks. tp and cp ranks hold equal
    # values (whole micro-batch losses), so they are left out.
    loss: DeviceMesh
    dp_rank: int                        # what the data loader is given; equal across tp and cp
    dp_size: int
    pp: DeviceMesh | None = None
    cp: DeviceMesh | None = None

    @property
    def rank(self) -> int:
        return self.world.get_rank()


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    """Build every mesh of `layout`; call on all ranks after `dist.init_process_group`.

    `device_type` is "cuda" or "cpu" (no index). Raises ValueError when the process group's world
    size differs from the layout's.
    """
    if dist.is_initialized() and dist.get_world_size() != layout.world:
        raise ValueError(f"build_meshes: the process group has {dist.get_world_size()} ranks, the "
                         f"layout was validated for world {layout.world}")
    split = layout.ep > 1
    axes = layout.axes() if split else [
        ("pp", layout.pp), ("dp_replicate", layout.dp_replicate), ("dp_shard", layout.dp_shard),
        ("cp", layout.cp), ("tp", layout.tp)]
    shard_root = "dp_shard_mod_ep" if split else "dp_shard"
    kept = [(n, s) for n, s in axes if s > 1 or n == shard_root]
    world = init_device_mesh(device_type, tuple(s for _, s in kept),
                             mesh_dim_names=tuple(n for n, _ in kept))
    joined: dict[tuple[str, ...], DeviceMesh] = {}

    def join(names: tuple[str, ...], flat_name: str) -> DeviceMesh | None:
        """The 1-D mesh over the axes `names` (those of size 1 dropped); one mesh per axis set."""
        present = tuple(n for n in names if n in world.mesh_dim_names)
        if not present:
            return None
        if present not in joined:
            joined[present] = (world[present[0]] if len(present) == 1
                               else world[present]._flatten(flat_name))
        return joined[present]

    def with_replicate(shard: DeviceMesh) -> DeviceMesh:
        """HSDP: (dp_replicate, shard) as one 2-D mesh, without new process groups."""
        if layout.dp_replicate == 1:
            return shard
        name = shard.mesh_dim_names[0]
        if name in world.mesh_dim_names:
            return world["dp_replicate", name]
        return DeviceMesh._concatenate([world["dp_replicate"], shard])  # as FSDP2 itself does for HSDP

    shard_axes = ("dp_shard_mod_ep", "dp_shard_in_ep", "cp") if split else ("dp_shard", "cp")
    fsdp_shard = join(shard_axes, "dp_shard_cp")
    tp = join(("tp",), "tp")
    rank = dist.get_rank()
    return Meshes(
        layout=layout,
        world=world,
        fsdp=with_replicate(fsdp_shard),
        tp=tp,
        ep=join(("dp_shard_in_ep", "cp"), "ep") if split else None,
        expert_fsdp=with_replicate(world["dp_shard_mod_ep"]) if split else None,
        vision=tp,
        loss=join(("dp_replicate",) + shard_axes[:-1], "dp"),
        dp_rank=layout.dp_rank(rank),
        dp_size=layout.dp,
        pp=join(("pp",), "pp"),
        cp=join(("cp",), "cp"),
    )
