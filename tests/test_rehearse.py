"""`python -m parallel.rehearse`: one step as rank r of N under a fake process group and fake
tensors. Its sharded parameter bytes equal those of a real gloo run of the same layout, and a
released-size config rehearses on this machine within minutes."""

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from parallel.rehearse import tensor_bytes
from tests.distributed import run_ranks

def rehearse(overrides: list[str], world_size: int, rank: int = 0) -> dict:
    """The CLI in its own process, as it is run (one rehearsal per process: torch's DTensor caches
    keep meshes of the process group a second rehearsal has replaced)."""
    out = subprocess.run([sys.executable, "-m", "parallel.rehearse", *overrides, "--world-size",
                          str(world_size), "--rank", str(rank), "--json"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY = ["model=tiny_vl", "parallel.tp=2", "parallel.ep=2", "data.batch_size=2", "data.seq_len=64"]
TINY_PP = ["model=tiny_vl", "parallel.pp=2", "parallel.tp=2", "train.grad_accum=2",
           "data.batch_size=2", "data.seq_len=64"]


def _real_sharded_bytes(rank: int, world: int, out_dir: str, overrides: list[str]) -> None:
    """The trainer's path on real tensors: `parallelize`, then this rank's part of the model."""
    from model.language_model import Qwen35LM
    from parallel.layout import pipeline_microbatches
    from parallel.mesh import build_meshes, validate_layout
    from parallel.plan import parallelize
    from train.main import load_config

    cfg = load_config(overrides)
    layout = validate_layout(cfg.parallel, cfg.model, world, cfg.data.seq_len,
                             grad_accum=cfg.train.grad_accum)
    meshes = build_meshes(layout, "cpu")
    torch.manual_seed(0)
    model = Qwen35LM(cfg.model)
    runner = parallelize(model, meshes, cfg.parallel, torch.device("cpu"),
                         num_microbatches=pipeline_microbatches(cfg.parallel, cfg.train.grad_accum))
    params = list(runner.model.parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    with open(f"{out_dir}/{rank}.json", "w") as f:
        json.dump({"params_bytes": tensor_bytes(params),
                   "params_numel": sum(t.numel() for t in local)}, f)


@pytest.mark.parametrize("overrides, layout, images", [
    (TINY, "pp=1 dp_replicate=1 dp_shard=2 cp=1 tp=2 ep=2", 1),
    # Two micro-batches of one image each through the pipeline's schedule; ranks 0 and 3 hold
    # the first and the last stage.
    (TINY_PP, "pp=2 dp_replicate=1 dp_shard=1 cp=1 tp=2 ep=1", 2)], ids=["tp2xep2", "pp2xtp2"])
def test_rehearsal_param_bytes_equal_a_real_run(tmp_path, monkeypatch, overrides, layout, images):
    monkeypatch.setenv("WORLD_SIZE", "4")  # the gloo ranks' config check reads it
    run_ranks(4, _real_sharded_bytes, str(tmp_path), overrides)
    monkeypatch.delenv("WORLD_SIZE")
    for rank in (0, 3):
        real = json.loads((tmp_path / f"{rank}.json").read_text())
        r = rehearse(overrides, world_size=4, rank=rank)
        assert (r["params_bytes"], r["params_numel"]) == (real["params_bytes"], real["params_numel"])
        assert r["layout"] == layout
        assert r["images"] == images  # the vision tower ran on the images
        # Storage bytes include FSDP2's padding of uneven shards; AdamW's states do not.
        assert r["grads_bytes"] >= 4 * r["params_numel"]  # every parameter got its fp32 grad
        assert r["optimizer_bytes"] == 2 * 4 * r["params_numel"]  # AdamW: exp_avg, exp_avg_sq
        assert r["activations_peak_bytes"] > 0
        assert r["peak_bytes"] >= r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]


def test_cli_prints_one_json_object():
    report = rehearse(["model=tiny", "data.batch_size=2", "data.seq_len=64"], world_size=2, rank=1)
    assert report["rank"] == 1 and report["world_size"] == 2
    assert report["layout"] == "pp=1 dp_replicate=1 dp_shard=2 cp=1 tp=1 ep=1"
    for key in ("params_numel", "params_bytes", "grads_bytes", "optimizer_bytes",
                "activations_peak_bytes", "peak_bytes", "wall_s"):
        assert report[key] > 0


@pytest.mark.slow
def test_35b_rehearses_on_8_ranks_within_minutes():
    from model.language_model import Qwen35LM
    from train.main import load_config

    overrides = ["model=qwen35_35b_a3b"]
    t0 = time.perf_counter()
    r = rehearse(overrides, world_size=8, rank=0)
    assert time.perf_counter() - t0 < 600
    # FSDP2 over 8 ranks: rank 0 holds the first ceil(d0 / 8) rows of every parameter, in fp32.
    with torch.device("meta"):
        model = Qwen35LM(load_config(overrides).model)
    numel = sum(min(math.ceil(p.shape[0] / 8), p.shape[0]) * math.prod(p.shape[1:])
                for p in model.parameters())
    assert r["params_numel"] == numel and r["params_bytes"] == 4 * numel
    assert r["peak_bytes"] >= r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
