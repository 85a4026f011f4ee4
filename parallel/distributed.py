"""Process-group start-up for the trainer, and the few reductions of logged values.

`python -m train.main` under torchrun (WORLD_SIZE > 1) starts one process group (NCCL on GPUs, gloo
on CPU) with the configured collective timeout, then builds the plan's meshes; a plain
`python -m train.main` is one process with no process group at all.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from model.config import ModelConfig
from parallel.config import ParallelConfig
from parallel.mesh import Meshes, build_meshes, layout_table, validate_layout

log = logging.getLogger("parallel")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def init_distributed(pcfg: ParallelConfig, model: ModelConfig, seq_len: int,
                     device: torch.device) -> Optional[Meshes]:
    """None for one process; else start the process group and return the meshes. The layout is
    checked again here (train/config.py checked it at start-up) to get its resolved sizes."""
    world = world_size()
    if world == 1:
        return None
    layout = validate_layout(pcfg, model, world, seq_len)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=pcfg.collective_timeout_s),
                                device_id=device if device.type == "cuda" else None)
    meshes = build_meshes(layout, device.type)
    if rank() == 0:
        log.info("parallel layout:\n%s", layout_table(layout, model, pcfg.vision.name))
    return meshes


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over(values: Sequence[float], mesh) -> list[float]:
    """Sum a few Python numbers over a mesh's ranks (one small all-reduce); unchanged without one."""
    if mesh is None or mesh.size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64,
                     device="cuda" if mesh.device_type == "cuda" else "cpu")
    for d in range(mesh.ndim):
        dist.all_reduce(t, group=mesh.get_group(d))
    return t.tolist()
