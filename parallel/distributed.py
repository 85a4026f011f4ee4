"""Process-group start-up for the trainer, and the few reductions of logged values.

`python -m train.main` under torchrun (WORLD_SIZE > 1) starts one process group (NCCL on GPUs, gloo
on CPU) with the configured collective timeout, keyed by torchrun's restart attempt so that an
elastic restart starts clean, then builds the plan's meshes; a plain `python -m train.main` is one
process with no process group at all. The reductions here are named collectives
(parallel/collectives.py): a hang fails saying which.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from model.config import ModelConfig
from parallel import collectives
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
        timeout = timedelta(seconds=pcfg.collective_timeout_s)
        store = attempt_store(timeout)
        explicit = {} if store is None else dict(store=store, rank=int(os.environ["RANK"]),
                                                 world_size=world)
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None, **explicit)
    meshes = build_meshes(layout, device.type)
    if rank() == 0:
        log.info("parallel layout:\n%s", layout_table(layout, model, pcfg.vision.name))
    return meshes


def attempt_store(timeout: timedelta) -> Optional[dist.Store]:
    """The process group's store under torchrun's shared rendezvous store, with keys of this
    restart attempt only; None elsewhere (the env:// default).

    torchrun (2.4 and later) lets the workers use its own TCPStore, which outlives a failed attempt,
    and torch prefixes the process group's keys with nothing that changes between attempts: after
    an elastic restart a rank can read the address its peer published in the previous attempt and
    fail ("Gloo connectFullMesh failed ... Connection refused"; for NCCL, pytorch/pytorch#135712).
    The restart count is the same for every worker of one torchrun agent, so on one node this
    prefix is exact. On several nodes an agent that restarts for a membership change does not
    count it, so there launch/torchrun.sh sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead (a
    fresh store per attempt, hosted by rank 0), and this function is not used."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and os.environ.get("RANK") == "0" and \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        log.warning("torchrun shares its rendezvous store with the workers of %s nodes: a restart "
                    "that some nodes do not count may stall the process group's start. Set "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/torchrun.sh does)",
                    os.environ["GROUP_WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"default_pg/attempt_{attempt}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over(values: Sequence[float], mesh) -> list[float]:
    """Sum a few Python numbers over a mesh's ranks (one small all-reduce); unchanged without one."""
    if mesh is None or mesh.size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64,
                     device="cuda" if mesh.device_type == "cuda" else "cpu")
    names = mesh.mesh_dim_names or tuple(f"dim {d}" for d in range(mesh.ndim))
    for d in range(mesh.ndim):
        collectives.all_reduce(t, f"trainer all_reduce of logged metrics over {names[d]}",
                               mesh.get_group(d))
    return t.tolist()
