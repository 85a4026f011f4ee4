"""No rank ever holds the whole model: built on the meta device, sharded by the plans and
materialised rank by rank, a model whose full size is more than a rank may hold starts with each
rank's live tensor bytes bounded by its own shards (parallel/memory_tracker.py counts them)."""

from __future__ import annotations

import torch

from model import init as model_init
from model.config import load_model_config
from parallel.config import ParallelConfig
from parallel.materialize import materialize
from parallel.memory_tracker import LiveBytes
from parallel.mesh import build_meshes, validate_layout
from parallel.plan import parallelize
from tests.distributed import run_ranks
from tests.meta_build import meta_model


def _big_cfg():
    cfg = load_model_config("tiny")
    cfg.vocab_size = 1 << 17          # embedding and LM head: 2 x 8M parameters, most of the model
    return cfg


def rank_budget(full_bytes: int, world: int) -> float:
    """What a rank may hold: its shards plus FSDP's padding and small buffers."""
    return full_bytes / world * 1.2


def check_starts_within_budget(rank: int, world: int) -> None:
    cfg = _big_cfg()
    full_bytes = sum(p.numel() * 4 for p in meta_model(cfg, torch.float32).parameters())
    model_init.SLAB = 1 << 16         # bound the init's index temporaries well below a shard
    model = meta_model(cfg, torch.float32)
    pcfg = ParallelConfig(dp_shard=world)
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=64), "cpu")
    with LiveBytes() as mem:
        runner = parallelize(model, meshes, pcfg, torch.device("cpu"))
        materialize(runner.model, "cpu", 1234)
    budget = rank_budget(full_bytes, world)
    assert full_bytes / world * 0.9 < mem.peak < budget, (rank, mem.peak, full_bytes)
    assert all(torch.isfinite(p.to_local()).all() for p in runner.model.parameters())


def test_model_larger_than_a_rank_starts_sharded():
    run_ranks(2, check_starts_within_budget)


def test_building_whole_would_exceed_the_budget():
    """The control: one process building the same model whole holds all of it."""
    with LiveBytes() as mem:
        model = meta_model(_big_cfg(), torch.float32)
        model.to_empty(device="cpu")
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert mem.peak >= full_bytes
    assert mem.peak > rank_budget(full_bytes, 2)  # more than the 2-rank test lets a rank hold
