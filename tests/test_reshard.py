"""Checkpoints that move between parallel layouts (issue 6, item 2).

- Model and optimizer state (weights, exp_avg, exp_avg_sq, step, per-parameter hyperparameters)
  written in one layout and loaded in another equal, gathered to full tensors, what was saved
  (in-process gloo ranks: tp, ep, dp_shard and world-size changes).
- Training resumed in another layout with the same data-parallel size (tp=2 <-> 1, ep=2 -> 1)
  logs the losses and gradient norms of the uninterrupted run (`python -m train.main` under
  torchrun).
- A run resumed with another data-parallel size goes on with the trained weights and schedule.
  The loader continues the same trajectory there (the same rows in every layout, every document
  once): tests/test_data_layout.py, tests/test_data_resize.py and tests/test_train_layout.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from data.packing import PackedRow, collate
from tests.distributed import run_ranks
from tests.test_train_distributed import train

# ---- model and optimizer state, in process ---------------------------------------------------


def _build(world: int, sizes: dict, seed: int):
    """The tiny model (+ MTP) in a layout, with the trainer's optimizer (groups split by mesh)."""
    from model.config import load_model_config
    from model.language_model import Qwen35LM
    from parallel.config import ParallelConfig
    from parallel.mesh import build_meshes, validate_layout
    from parallel.plan import parallelize
    from train.config import TrainConfig
    from train.optim import build_optimizer

    cfg = load_model_config("tiny")
    cfg.mtp_num_layers = 1
    torch.manual_seed(seed)
    model = Qwen35LM(cfg)
    meshes = None
    if world > 1:
        meshes = build_meshes(validate_layout(ParallelConfig(**sizes), cfg, world, seq_len=32), "cpu")
        parallelize(model, meshes, ParallelConfig(**sizes), torch.device("cpu"))
    return model, build_optimizer(model, TrainConfig(lr=1e-2)), meshes


def _full_state(model, opt) -> dict:
    """Model and flattened optimizer state, keyed by parameter name, as full CPU tensors (rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    m, o = get_state_dict(model, opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True))
    return {**{f"model.{k}": v for k, v in m.items()}, **{f"optim.{k}": v for k, v in o.items()}}


def _write(rank: int, world: int, sizes: dict, out: str) -> None:
    from parallel.grads import match_grad_placements
    from train.checkpoint import save_checkpoint

    model, opt, meshes = _build(world, sizes, seed=0)
    dp_rank, dp_size = (meshes.dp_rank, meshes.dp_size) if meshes else (0, 1)
    for step in range(2):  # two AdamW steps: non-trivial exp_avg, exp_avg_sq and step
        g = torch.Generator().manual_seed(100 * step + dp_rank)
        rows = [PackedRow(torch.randint(0, 1024, (32,), generator=g).tolist(), [20, 12], 0)
                for _ in range(2)]
        b = collate(rows)
        opt.zero_grad()
        model(b["input_ids"], position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"],
              labels=b["labels"]).loss.backward()
        match_grad_placements(model.parameters())
        opt.step()
    save_checkpoint(out, 2, model, opt, {"dp_rank": dp_rank, "dp_size": dp_size, "tag": dp_rank})
    full = _full_state(model, opt)
    if rank == 0:
        torch.save(full, f"{out}/full.pt")


def _read(rank: int, world: int, sizes: dict, out: str, old_dp: int) -> None:
    from train.checkpoint import latest_checkpoint, load_checkpoint

    model, opt, meshes = _build(world, sizes, seed=1)  # other weights: the load must replace them
    dp_rank, dp_size = (meshes.dp_rank, meshes.dp_size) if meshes else (0, 1)
    extra = load_checkpoint(latest_checkpoint(out), model, opt, dp_rank, dp_size)
    if dp_size == old_dp:  # an old rank of this data-parallel rank
        assert extra["tag"] == dp_rank and "dp_extras" not in extra
    else:  # every old dp rank's extra, to remap from
        assert [e["tag"] for e in extra["dp_extras"]] == list(range(old_dp))
    got = _full_state(model, opt)
    if rank != 0:
        return
    want = torch.load(f"{out}/full.pt", weights_only=False)
    assert got.keys() == want.keys()
    assert any(k.endswith(".exp_avg_sq") for k in want) and any(k.endswith(".step") for k in want)
    bad = [k for k in want if not (torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor)
                                   else got[k] == want[k])]
    assert not bad, bad[:10]


@pytest.mark.parametrize("old,new", [
    ((2, {"tp": 2}), (1, {})),
    ((1, {}), (2, {"tp": 2})),
    ((2, {"dp_shard": 2, "ep": 2}), (2, {"dp_shard": 2})),
    ((2, {"dp_shard": 2}), (1, {})),
    ((2, {"dp_shard": 2, "ep": 2}), (4, {"dp_shard": 4})),
    pytest.param((4, {"dp_shard": 2, "tp": 2}), (2, {"dp_shard": 2, "ep": 2}), marks=pytest.mark.slow),
], ids=["tp2-to-1", "1-to-tp2", "ep2-to-ep1", "dp2-to-1", "dp2ep2-to-dp4",
        "dp2tp2-to-dp2ep2"])
def test_model_and_optimizer_state_move_between_layouts(tmp_path, old, new):
    run_ranks(old[0], _write, old[1], str(tmp_path))
    old_dp = old[1].get("dp_shard", 1) if old[0] > 1 else 1
    run_ranks(new[0], _read, new[1], str(tmp_path), old_dp)


# ---- training resumed in another layout -----------------------------------------------------

KEYS = ("loss", "ce", "mtp_ce", "moe_aux", "grad_norm", "lr")
# name, processes, overrides
TP2 = ("tp2", 2, ["parallel.tp=2"])
ONE = ("one", 1, [])
EP2 = ("dp2-ep2", 2, ["parallel.dp_shard=2", "parallel.ep=2"])
DP2 = ("dp2", 2, ["parallel.dp_shard=2"])  # ep=1
ONE_GA2 = ("one-ga2", 1, ["train.grad_accum=2"])
PP2 = ("pp2", 2, ["parallel.pp=2", "train.grad_accum=2"])  # the step's 2 micro-batches pipelined
CP2 = ("cp2", 2, ["parallel.cp=2"])  # logs one process's losses, as tp=2 does


def _cached_run(cache, layout, steps: int):
    """`steps` steps in `layout` (a checkpoint after the last), run once per module."""
    d = cache / f"{layout[0]}-{steps}"
    if not (d / "metrics.jsonl").exists():
        train(d, layout[1], f"train.max_steps={steps}", f"checkpoint.interval={steps}", *layout[2])
    return d


def _resume(tmp_path, first3, layout) -> list[dict]:
    """Steps 4..6 in `layout` from a copy of the run `first3` (its metrics.jsonl gets them)."""
    run = tmp_path / "resumed"
    shutil.copytree(first3, run)
    return train(run, layout[1], "train.max_steps=6", "checkpoint.interval=0", *layout[2])


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reshard")


@pytest.mark.parametrize("old,new,ref", [
    pytest.param(TP2, ONE, ONE, id="tp2-to-1"),
    pytest.param(ONE, TP2, ONE, id="1-to-tp2", marks=pytest.mark.slow),  # the same move backwards
    pytest.param(EP2, DP2, EP2, id="dp2-ep2-to-dp2-ep1"),
    pytest.param(PP2, ONE_GA2, ONE_GA2, id="pp2-to-1"),
    pytest.param(CP2, ONE, ONE, id="cp2-to-1"),
])
def test_resume_in_another_layout_continues_the_same_losses(tmp_path, cache, old, new, ref):
    """3 steps in the old layout + 3 in the new equal 6 uninterrupted steps (reduction order
    differs between layouts: fp32 tolerance). tp=2 logs the losses of one process (see
    tests/test_train_distributed.py), so one process's run is the reference of both tp cases. The
    optimizer state carries over, or steps 4..6 and their gradient norms would differ."""
    want = _metrics(_cached_run(cache, ref, 6))
    got = _resume(tmp_path, _cached_run(cache, old, 3), new)
    assert [r["step"] for r in got] == list(range(1, 7))
    for key in KEYS:
        assert [r[key] for r in got[3:]] == pytest.approx([r[key] for r in want[3:]], rel=2e-5), key


def test_resume_with_another_data_parallel_size_runs_on(tmp_path, cache):
    """dp_shard=2 (ep=2) -> one process with twice the micro-batch (the same global batch): the
    schedule and the optimizer carry over and training goes on, on the same rows (the MoE aux loss
    is per micro-batch, so the losses are close, not equal)."""
    one = (ONE[0], ONE[1], ["data.batch_size=4"])
    got = _resume(tmp_path, _cached_run(cache, EP2, 3), one)
    want = _metrics(_cached_run(cache, EP2, 6))
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["tokens"] for r in got] == [4 * 64] * 6
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in want], rel=1e-12)
    # The trained weights carried over: a fresh model logs the first step's ~9.0 again.
    assert got[3]["loss"] < got[0]["loss"] - 0.1
    assert [r["loss"] for r in got[3:]] == pytest.approx([r["loss"] for r in want[3:]], rel=0.03)
