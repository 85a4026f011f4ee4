"""Run a function on N gloo ranks on this machine, for the multi-process tests.

The ranks are forked (they inherit the imported torch and model code: spawning re-imports them,
seconds per process on two busy cores) and meet through a file store. An exception in any rank
fails the calling test with that rank's traceback; a hung collective fails after `timeout_s`."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, store: str, timeout_s: float, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout_s: float = 120) -> None:
    """fn(rank, world, *args) on `world` processes; fn must be importable (module level)."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(world, os.path.join(d, "store"), timeout_s, fn, args),
                           nprocs=world, join=True, start_method=method)
