"""Collective accounting: the counting mode (parallel/comm_count.py) on collectives whose bytes are
known by hand (cross-checked against torch's CommDebugMode), then counted == analytic
(parallel/comm_model.py) on every rank for a whole training step of the tiny multimodal model (with
an MTP block) under dp_shard=2, tp=2 (+ the balanced vision plan), ep=2, cp=2, and with
activation checkpointing, on 2 gloo ranks."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks


def hand_cases(rank: int, world: int) -> None:
    from torch.distributed._functional_collectives import reduce_scatter_tensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.debug import CommDebugMode

    from parallel.comm_count import CommCounter, CommStat

    solo = [dist.new_group([r]) for r in range(world)][rank]
    mesh = init_device_mesh("cpu", (world,))
    sharded = DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False)
    partial = DTensor.from_local(torch.ones(7), mesh, [Partial()], run_check=False)
    labels = {dist.group.WORLD.group_name: "world", solo.group_name: "solo"}
    assert mesh.get_group().group_name == dist.group.WORLD.group_name

    counter = CommCounter(labels, keep_events=True)
    with CommDebugMode() as debug, counter:
        dist.all_reduce(torch.ones(10))                                   # 40 B, ring: 2 x 40 / 2
        dist.all_gather_into_tensor(torch.empty(6, dtype=torch.float64),
                                    torch.ones(3, dtype=torch.float64))   # out 48 B, sends 24
        dist.reduce_scatter_tensor(torch.empty(4), torch.ones(8))         # in 32 B, sends 16
        send = [[3, 1], [2, 2]][rank]                                     # rows of 5 fp32 = 20 B
        recv = [[3, 2], [1, 2]][rank]
        dist.all_to_all_single(torch.empty(sum(recv), 5), torch.ones(sum(send), 5), recv, send)
        dist.all_reduce(torch.ones(4), group=solo)                         # one rank: sends nothing
        # DTensor and functional collectives (torch.ops._c10d_functional), each counted once
        sharded.redistribute(mesh, [Replicate()]).to_local().sum()        # all-gather, out 48 B
        partial.redistribute(mesh, [Replicate()]).to_local().sum()        # all-reduce 28 B
        reduce_scatter_tensor(torch.ones(6), "sum", 0, mesh).sum()        # in 24 B, sends 12

    expected = {
        ("all_reduce", "world"): CommStat(2, 40 + 28, Fraction(40 + 28)),
        ("all_gather", "world"): CommStat(2, 48 + 48, Fraction(24 + 24)),
        ("reduce_scatter", "world"): CommStat(2, 32 + 24, Fraction(16 + 12)),
        ("all_to_all", "world"): CommStat(1, 4 * 20, Fraction([1, 2][rank] * 20)),
        ("all_reduce", "solo"): CommStat(1, 16, Fraction(0)),
    }
    assert counter.table() == dict(sorted(expected.items())), (rank, counter.events)
    assert debug.get_total_counts() == sum(s.calls for s in expected.values())


ROWS, SEQ_LEN = 2, 64
LAYOUTS = {                                          # name: (parallel sizes, vision plan)
    "dp2": ({"dp_shard": 2}, "balanced"),            # FSDP2
    "tp2": ({"tp": 2}, "balanced"),                  # TP + SP + the vision plan over tp
    "tp2-ac": ({"tp": 2, "activation_checkpoint": "full"}, "replicated"),
    # EP (+ FSDP of the rest); selective AC recomputes layers 1 and 3 only. One EP layout per
    # process: a second one there finds the first one's size-1 expert_dp group in its expert
    # DTensors' mesh (torch caches meshes), which mesh_group_labels cannot name.
    "ep2-ac": ({"dp_shard": 2, "ep": 2, "activation_checkpoint": "selective"}, "balanced"),
    # CP: K/V gathers, GDN halos and summaries, MoE counts, loss reductions; selective AC repeats
    # the forward gathers of layers 1 and 3.
    "cp2-ac": ({"cp": 2, "activation_checkpoint": "selective"}, "balanced"),
}


def all_cases(rank: int, world: int, out_dir: str) -> None:
    """One spawn for everything (starting ranks costs more than the steps): the hand-computed
    cases, then one counted step of each layout (benchmarks/bench_parallel.py's run_layout)."""
    from benchmarks.bench_parallel import run_layout

    hand_cases(rank, world)
    Path(out_dir, f"hand{rank}").write_text("ok")
    for name, (sizes, vision) in LAYOUTS.items():
        sub = Path(out_dir, name)
        sub.mkdir(exist_ok=True)
        run_layout(rank, world, sizes, vision, "tiny_vl", 1, ROWS, SEQ_LEN, 0, str(sub))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("comm")
    run_ranks(2, all_cases, str(out))
    return out


def test_counter_on_hand_computed_collectives(results):
    assert all(Path(results, f"hand{r}").read_text() == "ok" for r in range(2))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_counted_equals_analytic(results, name):
    from benchmarks.bench_parallel import counted_table, layout_spec
    from model.config import load_model_config
    from parallel.comm_model import EPTraffic, predict_table
    from parallel.config import ParallelConfig
    from parallel.layout import validate_layout

    sizes, vision = LAYOUTS[name]
    cfg = load_model_config("tiny_vl")
    cfg.mtp_num_layers = 1
    pcfg = ParallelConfig(**sizes)
    layout = validate_layout(pcfg, cfg, 2, seq_len=SEQ_LEN)
    for rank in range(2):
        r = json.loads(Path(results, name, f"rank{rank}.json").read_text())
        counted = counted_table(r)
        spec = layout_spec(r, vision, pcfg)
        exact = predict_table(cfg, layout, spec, EPTraffic(r["ep_sent"], r["ep_local"]))
        assert counted == exact, (rank, counted, exact)
        if layout.ep > 1:  # uniform routing: only the EP rows differ, and not by much
            uniform = predict_table(cfg, layout, spec)
            a2a = ("all_to_all", "dp_shard+ep")
            assert {k: v for k, v in uniform.items() if k != a2a} == \
                   {k: v for k, v in counted.items() if k != a2a}
            assert abs(float(uniform[a2a].sent / counted[a2a].sent) - 1) < 0.25
        else:
            assert r["ep_sent"] == r["ep_local"] == 0
