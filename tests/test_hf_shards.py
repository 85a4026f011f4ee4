"""`train.init_from_hf`: an HF directory read straight into each rank's shards. The weights equal
the one-process load (`load_pretrained`) under every layout, and a rank reads only the bytes of
its own shards (counted by the reader), not the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.tensor import DTensor

from hf_fixtures import save_hf_model
from model.config import ConfigError
from model.init import canonical_name
from train.checkpoint.hf_convert import load_pretrained
from train.checkpoint.hf_shards import load_hf_shards
from tests.distributed import run_ranks

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> HF directory (sharded, index); qwen3_5_moe also with fused experts."""
    out = {}
    for fam in ("qwen3_5_moe", "qwen3_next"):
        d = tmp_path_factory.mktemp(fam)
        save_hf_model(fam, d, max_shard_size="200KB")
        out[fam] = d
    # The fused expert layout (transformers' module names): written from the per-expert one.
    from safetensors.torch import save_file

    from train.checkpoint.hf_files import HFReader

    src, fused = out["qwen3_5_moe"], tmp_path_factory.mktemp("fused")
    reader = HFReader(src)
    state = {k: reader.get(k) for k in reader.keys()}
    for layer in range(4):
        p = f"model.language_model.layers.{layer}.mlp.experts."
        gate = [state.pop(f"{p}{e}.gate_proj.weight") for e in range(8)]
        up = [state.pop(f"{p}{e}.up_proj.weight") for e in range(8)]
        down = [state.pop(f"{p}{e}.down_proj.weight") for e in range(8)]
        state[f"{p}gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        state[f"{p}down_proj"] = torch.stack(down)
    save_file(state, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((src / "config.json").read_text())
    out["fused"] = fused
    return out


def _empty_model(cfg):
    from model.language_model import Qwen35LM
    from parallel.materialize import materialize, reset_all_buffers

    with torch.device("meta"):
        model = Qwen35LM(cfg)
    materialize(model, "cpu", 0, values=False)
    reset_all_buffers(model)
    return model


@pytest.mark.parametrize("layout", ["qwen3_5_moe", "qwen3_next", "fused"])
def test_one_process_slices_equal_the_whole_tensor_import(layout, hf_dirs):
    """Fused in_proj_qkv / conv1d / qkvz splits, per-expert and fused experts, the ViT: every
    tensor assembled from slices equals the importer's whole-tensor conversion."""
    expect = load_pretrained(hf_dirs[layout])
    model = _empty_model(expect.cfg)
    stats = load_hf_shards(model, hf_dirs[layout], expect.cfg)
    for k, v in expect.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert stats["bytes_read"] == stats["local_bytes"]  # fp32 on both sides, every byte once


def _check_rank(rank, world, hf_dir, layout, expected_path):
    from model.hf.config_map import hf_to_model_config
    from parallel.config import ParallelConfig
    from parallel.materialize import materialize, reset_all_buffers
    from parallel.mesh import build_meshes, validate_layout
    from parallel.plan import parallelize
    from tests.meta_build import meta_model

    cfg = hf_to_model_config(json.loads((hf_dir / "config.json").read_text()))
    pcfg = ParallelConfig(**layout)
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=64), "cpu")
    runner = parallelize(meta_model(cfg, torch.float32), meshes, pcfg, torch.device("cpu"))
    materialize(runner.model, "cpu", 0, values=False)
    reset_all_buffers(runner.model)
    stats = load_hf_shards(runner.model, hf_dir, cfg)
    expect = torch.load(expected_path)
    for name, p in runner.model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        assert torch.equal(full.detach(), expect[canonical_name(name)]), (layout, name)
    total = sum(t.numel() * 4 for t in expect.values())
    # Each rank reads exactly its own shards' bytes: half the model under FSDP (plus padding-free
    # rounding); under tp=2 also what TP replicates (routed experts, the ViT, norms: 3/4 here).
    assert stats["bytes_read"] == stats["local_bytes"], stats
    bound = 0.8 if "tp" in layout else 0.52
    assert stats["bytes_read"] < bound * total, (layout, stats, total)


@pytest.mark.parametrize("layout", [
    pytest.param({"tp": 2}, id="tp2"),
    pytest.param({"dp_shard": 2}, id="dp_shard2"),
    pytest.param({"dp_shard": 2, "ep": 2}, id="dp_shard2-ep2"),
])
def test_two_ranks_read_their_shards_and_equal_one_process(layout, hf_dirs, tmp_path):
    model = load_pretrained(hf_dirs["qwen3_5_moe"])
    expected = tmp_path / "expected.pt"
    torch.save({k: v for k, v in model.named_parameters()}, expected)
    run_ranks(2, _check_rank, hf_dirs["qwen3_5_moe"], layout, expected)


def test_tp_split_of_fused_qwen3_next_projections(hf_dirs, tmp_path):
    """Qwen3-Next's per-head in_proj_qkvz / in_proj_ba: each tp rank reads only its heads' rows."""
    model = load_pretrained(hf_dirs["qwen3_next"])
    expected = tmp_path / "expected.pt"
    torch.save({k: v for k, v in model.named_parameters()}, expected)
    run_ranks(2, _check_rank, hf_dirs["qwen3_next"], {"tp": 2}, expected)


def test_model_config_is_checked_against_config_json(hf_dirs):
    from train.main import load_config

    d = hf_dirs["qwen3_5_moe"]
    with pytest.raises(ConfigError, match=r"model.num_layers=2, config.json says 4"):
        load_config(["model=tiny", "model.num_layers=2", f"train.init_from_hf={d}"])
    cfg = load_config(["model=from_hf", f"train.init_from_hf={d}", "model.router_z_loss_coef=0.01"])
    assert cfg.model.num_layers == 4 and cfg.model.vision is not None
    assert cfg.model.router_z_loss_coef == 0.01  # a training knob from the command line is kept
    with pytest.raises(ConfigError, match="model=from_hf: needs train.init_from_hf"):
        load_config(["model=from_hf"])
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(["model=from_hf", f"train.init_from_hf={d / 'nope'}"])
