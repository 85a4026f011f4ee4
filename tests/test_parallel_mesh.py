"""Layouts from `parallel.*`: the start-up checks (plain calls, no process group) and the meshes
built in 4 real gloo processes, whose groups must follow Megatron's rank order."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from model.config import ConfigError, ModelConfig
from parallel.config import ParallelConfig, VisionPlanConfig
from parallel.layout import Layout, layout_table, validate_layout

# The smoke model's sizes with 8 attention heads (as in the rules' messages).
MODEL = ModelConfig(vocab_size=1024, num_attention_heads=8, num_key_value_heads=2,
                    linear_num_key_heads=2, linear_num_value_heads=4, num_experts=8,
                    intermediate_size=256, shared_expert_intermediate_size=64)


def check(world=4, model=MODEL, seq_len=256, **parallel):
    vision = parallel.pop("vision", "balanced")
    return validate_layout(ParallelConfig(vision=VisionPlanConfig(name=vision), **parallel),
                           model, world, seq_len)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tp=0), "parallel.tp=0: must be >= 1"),
    (dict(ep=0), "parallel.ep=0: must be >= 1"),
    (dict(dp_replicate=-1), "parallel.dp_replicate=-1: must be >= 1"),
    (dict(dp_shard=0), "parallel.dp_shard=0: must be >= 1, or -1 (what the world size leaves over)"),
    (dict(dp_shard=2, tp=1), "parallel.pp*dp_replicate*dp_shard*cp*tp = 1*1*2*1*1 = 2: must equal "
                             "the world size 4 (from WORLD_SIZE)"),
    (dict(world=6, dp_replicate=4), "parallel.dp_shard=-1: the world size 6 (from WORLD_SIZE) must be "
                                    "divisible by parallel.pp*dp_replicate*cp*tp = 1*4*1*1 = 4"),
    (dict(world=3, tp=3), "parallel.tp=3: must divide model.num_attention_heads=8 (attention heads "
                          "are split across tensor-parallel ranks)"),
    (dict(world=3, tp=3, seq_len=None,
          model=replace(MODEL, num_attention_heads=6, linear_num_key_heads=3, linear_num_value_heads=3,
                        vocab_size=1023, shared_expert_intermediate_size=63)),
     "parallel.tp=3: must divide model.num_key_value_heads=2 or be a multiple of it"),
    (dict(tp=2, model=replace(MODEL, linear_num_key_heads=1, linear_num_value_heads=4)),
     "parallel.tp=2: must divide model.linear_num_key_heads=1 (Gated DeltaNet key heads"),
    (dict(tp=4, model=replace(MODEL, num_key_value_heads=4, linear_num_key_heads=4,
                              linear_num_value_heads=6)),
     "parallel.tp=4: must divide model.linear_num_value_heads=6 (Gated DeltaNet value heads"),
    (dict(tp=2, model=replace(MODEL, vocab_size=1025)),
     "parallel.tp=2: must divide model.vocab_size=1025 (the embedding and LM head are split by vocabulary)"),
    (dict(tp=2, model=replace(MODEL, mlp_type="dense", intermediate_size=255)),
     "parallel.tp=2: must divide model.intermediate_size=255"),
    (dict(tp=2, model=replace(MODEL, shared_expert_intermediate_size=33)),
     "parallel.tp=2: must divide model.shared_expert_intermediate_size=33"),
    (dict(tp=2, seq_len=255), "parallel.tp=2: must divide data.seq_len=255 (sequence parallelism"),
    (dict(ep=3, world=3), "parallel.ep=3: must divide model.num_experts=8"),
    (dict(ep=4, tp=2), "parallel.ep=4: must divide parallel.dp_shard*cp = 2*1 = 2 (experts are carved "
                       "from the FSDP ranks, MoE parallel folding; dp_shard=-1 resolved to 2 from "
                       "WORLD_SIZE=4)"),
    (dict(ep=2, model=replace(MODEL, mlp_type="dense")), "parallel.ep=2: needs an MoE model"),
    (dict(pp=2, model=replace(MODEL, num_layers=3)),
     "model.num_layers=3: must be divisible by parallel.pp * pp_virtual_stages = 2*1 = 2 stages"),
    (dict(cp=2, seq_len=255), "parallel.cp=2: parallel.cp*tp = 2*1 must divide data.seq_len=255 "
                              "(context parallelism gives each rank an equal slice"),
    (dict(world=2, cp=2, ep=4), "parallel.ep=4: must divide parallel.dp_shard*cp = 1*2 = 2"),
    (dict(param_dtype="fp16"), "parallel.param_dtype='fp16': must be one of 'auto', 'bf16', 'fp32'"),
    (dict(activation_checkpoint="some"), "parallel.activation_checkpoint='some': must be one of 'none'"),
    (dict(selective_ac_every=0), "parallel.selective_ac_every=0: must be >= 1"),
    (dict(expert_capacity_factor=0.0), "parallel.expert_capacity_factor=0.0: must be > 0, or null"),
    (dict(collective_timeout_s=0), "parallel.collective_timeout_s=0: must be > 0"),
    (dict(vision="sharded"), "parallel.vision.name='sharded': must be one of 'balanced', 'replicated'"),
    (dict(world=0), "WORLD_SIZE=0: the world size must be >= 1"),
])
def test_each_rule_names_field_value_and_rule(kwargs, message):
    with pytest.raises(ConfigError) as e:
        check(**kwargs)
    assert "\n" not in str(e.value)
    assert message in str(e.value), str(e.value)


def test_good_layouts_resolve():
    assert check(world=1) == Layout(world=1)
    assert check(world=8, tp=2, ep=2) == Layout(world=8, dp_shard=4, tp=2, ep=2)
    layout = check(world=8, dp_replicate=2, dp_shard=2, tp=2, ep=2)
    assert (layout.dp, layout.dp_shard_cp, layout.dp_shard_mod_ep, layout.dp_shard_in_ep) == (4, 2, 1, 2)
    assert check(world=2, tp=2, seq_len=None).tp == 2  # seq_len unknown: not checked
    assert check(world=8, ep=4).dp_shard_mod_ep == 2


def test_layout_arithmetic_follows_megatron_order():
    layout = Layout(world=16, dp_replicate=2, dp_shard=4, tp=2, ep=2)
    assert layout.group("tp", 5) == [4, 5]                   # tp ranks are consecutive
    assert layout.group("dp_shard", 0) == [0, 2, 4, 6]
    assert layout.group("dp_replicate", 0) == [0, 8]          # replicas are the slowest dp dim
    assert layout.group("ep", 0) == [0, 2]                    # consecutive dp_shard ranks
    assert layout.group("expert_fsdp", 0) == [0, 4]
    assert layout.group("dp", 3) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert [layout.dp_rank(r) for r in range(16)] == [r // 2 for r in range(16)]


def test_layout_table_says_what_each_dim_splits():
    table = layout_table(check(world=8, tp=2, ep=2), MODEL)
    assert "world 8 = pp 1 x dp_replicate 1 x dp_shard 4 x cp 1 x tp 2, ep 2" in table
    tp_row = next(line for line in table.splitlines() if line.strip().startswith("tp "))
    assert "[0, 1]" in tp_row and "attention heads 8->4 per rank" in tp_row
    assert "GDN heads k 2->1 v 4->2" in tp_row and "vocab 1024->512" in tp_row
    ep_row = next(line for line in table.splitlines() if line.strip().startswith("ep "))
    assert "[0, 2]" in ep_row and "experts 8->4 per EP rank" in ep_row
    dp_row = next(line for line in table.splitlines() if line.strip().startswith("dp (data)"))
    assert "[0, 2, 4, 6]" in dp_row


def test_cli_stops_on_a_bad_layout(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    proc = subprocess.run([sys.executable, "-m", "train.main", "experiment=smoke_cpu_text",
                           f"run_dir={run_dir}", "parallel.tp=3"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "config error: parallel.tp=3: must divide model.num_attention_heads=4 (attention heads are "
        "split across tensor-parallel ranks)"]
    assert not run_dir.exists()


def test_config_validation_reads_the_world_size_from_the_environment(monkeypatch):
    from train.main import load_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"parallel.pp\*dp_replicate\*dp_shard\*cp\*tp = 1\*1\*1\*1\*2 = 2: "
                                          r"must equal the world size 4 \(from WORLD_SIZE\)"):
        load_config(["experiment=smoke_cpu_text", "parallel.tp=2", "parallel.dp_shard=1"])
    assert load_config(["experiment=smoke_cpu_text", "parallel.tp=2"]).parallel.tp == 2
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two': must be a positive integer"):
        load_config(["experiment=smoke_cpu_text"])


# ---- meshes in 4 gloo processes ------------------------------------------------------------------

LAYOUTS = {
    "dp_shard4": Layout(world=4, dp_shard=4),
    "tp2_dp2": Layout(world=4, dp_shard=2, tp=2),
    "tp2_ep2": Layout(world=4, dp_shard=2, tp=2, ep=2),
    "hsdp2x2_ep2": Layout(world=4, dp_replicate=2, dp_shard=2, ep=2),
    "dp4_ep2": Layout(world=4, dp_shard=4, ep=2),
    "cp2_dp2": Layout(world=4, dp_shard=2, cp=2),
    "cp2_ep2": Layout(world=4, dp_shard=2, cp=2, ep=2),
}


def _ranks(mesh):
    return None if mesh is None else mesh.mesh.tolist()


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from parallel.mesh import build_meshes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name, layout in LAYOUTS.items():
        m = build_meshes(layout, "cpu")
        res = {k: _ranks(getattr(m, k)) for k in
               ("fsdp", "tp", "ep", "expert_fsdp", "vision", "loss", "cp")}
        res.update(dp_rank=m.dp_rank, dp_size=m.dp_size, world_dims=list(m.world.mesh_dim_names),
                   fsdp_dims=list(m.fsdp.mesh_dim_names))
        # The groups are real: a sum over each 1-D mesh's group sees exactly its members.
        sums = {}
        for k in ("tp", "ep", "loss"):
            mesh = getattr(m, k)
            if mesh is not None and mesh.ndim == 1:
                t = torch.tensor([rank])
                dist.all_reduce(t, group=mesh.get_group())
                sums[k] = int(t)
        if m.fsdp.ndim == 2:  # HSDP: both dims of the 2-D mesh
            for dim in range(2):
                t = torch.tensor([rank])
                dist.all_reduce(t, group=m.fsdp.get_group(dim))
                sums[f"fsdp{dim}"] = int(t)
        res["sums"] = sums
        results[name] = res
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("meshes")
    # fork: the children inherit the imported torch (spawn re-imports it, ~15 s on 2 busy cores);
    # they only build meshes and run one-element collectives, so no OpenMP pool is touched.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(4, str(tmp / "store"), str(tmp)), nprocs=4, start_method=method)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(4)]


def _flat(x):
    return [v for row in x for v in row] if x and isinstance(x[0], list) else x


def test_meshes_follow_megatron_rank_order(mesh_results):
    r = [res["dp_shard4"] for res in mesh_results]
    assert all(x["fsdp"] == [0, 1, 2, 3] and x["tp"] is None and x["ep"] is None for x in r)
    assert [x["dp_rank"] for x in r] == [0, 1, 2, 3] and r[0]["world_dims"] == ["dp_shard"]

    r = [res["tp2_dp2"] for res in mesh_results]
    assert [x["tp"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]   # tp ranks are consecutive
    assert [x["fsdp"] for x in r] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [x["vision"] for x in r] == [x["tp"] for x in r]
    assert [x["dp_rank"] for x in r] == [0, 0, 1, 1] and r[0]["dp_size"] == 2

    r = [res["tp2_ep2"] for res in mesh_results]
    assert [x["tp"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [x["ep"] for x in r] == [[0, 2], [1, 3], [0, 2], [1, 3]]    # carved from dp_shard
    assert [x["expert_fsdp"] for x in r] == [[0], [1], [2], [3]]       # dp_shard_mod_ep = 1
    assert [x["fsdp"] for x in r] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [x["dp_rank"] for x in r] == [0, 0, 1, 1]

    r = [res["hsdp2x2_ep2"] for res in mesh_results]
    assert [x["fsdp"] for x in r] == [[[0, 1], [2, 3]]] * 4             # (dp_replicate, dp_shard)
    assert r[0]["fsdp_dims"][0] == "dp_replicate"
    assert [x["ep"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [x["expert_fsdp"] for x in r] == [[[0], [2]], [[1], [3]], [[0], [2]], [[1], [3]]]
    assert [x["loss"] for x in r] == [[0, 1, 2, 3]] * 4
    assert [x["dp_rank"] for x in r] == [0, 1, 2, 3] and r[0]["dp_size"] == 4
    assert [x["sums"]["fsdp0"] for x in r] == [2, 4, 2, 4]             # replicas: {0,2}, {1,3}
    assert [x["sums"]["fsdp1"] for x in r] == [1, 1, 5, 5]             # shards: {0,1}, {2,3}

    r = [res["dp4_ep2"] for res in mesh_results]
    assert [x["ep"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [x["expert_fsdp"] for x in r] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [x["fsdp"] for x in r] == [[0, 1, 2, 3]] * 4

    r = [res["cp2_dp2"] for res in mesh_results]
    assert [x["cp"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]     # cp after tp, before dp
    assert [x["fsdp"] for x in r] == [[0, 1, 2, 3]] * 4                 # FSDP over dp_shard x cp
    assert [x["loss"] for x in r] == [[0, 2], [1, 3], [0, 2], [1, 3]]   # cp ranks hold whole losses
    assert [x["dp_rank"] for x in r] == [0, 0, 1, 1] and r[0]["vision"] is None

    r = [res["cp2_ep2"] for res in mesh_results]
    assert [x["ep"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]     # an EP group = the cp ranks
    assert [x["expert_fsdp"] for x in r] == [[0, 2], [1, 3], [0, 2], [1, 3]]


def test_meshes_match_layout_arithmetic_and_groups_are_real(mesh_results):
    for name, layout in LAYOUTS.items():
        for rank, res in enumerate(mesh_results):
            x = res[name]
            assert x["dp_rank"] == layout.dp_rank(rank) and x["dp_size"] == layout.dp
            if x["tp"] is not None:
                assert x["tp"] == layout.group("tp", rank)
                assert x["sums"]["tp"] == sum(x["tp"])
                # the tp ranks of one dp rank read the same data
                assert {mesh_results[t][name]["dp_rank"] for t in x["tp"]} == {x["dp_rank"]}
            if x["ep"] is not None:
                assert x["ep"] == layout.group("ep", rank) and x["sums"]["ep"] == sum(x["ep"])
            assert sorted(_flat(x["loss"])) == layout.group("loss", rank)
            if "loss" in x["sums"]:
                assert x["sums"]["loss"] == sum(_flat(x["loss"]))
