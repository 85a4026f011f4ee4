"""parallel/memory.py against a live-tensor measurement, the launch memory check, parallel/suggest.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from parallel.layout import Layout
from parallel.memory import GIB, MemorySpec, estimate_memory, spec_from_config, with_spec
from parallel.memory_tracker import LiveBytes, grads, optimizer_tensors
from parallel.suggest import enumerate_layouts, format_table, suggest_layouts
from model.config import load_model_config
from train.main import load_config, memory_error

ROOT = Path(__file__).resolve().parents[1]


def measured_and_estimated(tmp_path, overrides):
    """Peak live bytes of the second training step (optimizer states exist) and the estimate."""
    from train.trainer import Trainer

    cfg = load_config(["experiment=smoke_cpu_text", "logging.wandb=disabled",
                       "checkpoint.interval=0", *overrides])
    tr = Trainer(cfg, tmp_path)
    tr.train_step()
    ps = list(tr.model.parameters())
    with LiveBytes(ps, grads(ps), optimizer_tensors(tr.optimizer), tr.model.buffers()) as mem:
        tr.train_step()
    est = estimate_memory(cfg.model, Layout(world=1), spec_from_config(cfg, "cpu"))
    return mem.peak, est


@pytest.mark.parametrize("overrides", [
    ["model=tiny", "data.seq_len=128", "data.batch_size=2"],
    ["model=tiny", "data.seq_len=256", "data.batch_size=4", "parallel.activation_checkpoint=full"],
    ["model=tiny", "data.seq_len=256", "data.batch_size=4", "model.mlp_type=dense"],
])
def test_estimate_within_15_percent_of_measured(tmp_path, overrides):
    measured, est = measured_and_estimated(tmp_path, overrides)
    assert abs(est.peak_bytes / measured - 1) < 0.15, (measured, est.summary())


def test_full_checkpointing_frees_recomputed_moe_activations(tmp_path):
    # The MoE's aux losses from a recompute used to keep every recomputed activation alive.
    plain, _ = measured_and_estimated(tmp_path / "a", ["model=tiny", "data.seq_len=256", "data.batch_size=4"])
    full, _ = measured_and_estimated(tmp_path / "b", ["model=tiny", "data.seq_len=256", "data.batch_size=4",
                                                      "parallel.activation_checkpoint=full"])
    assert full < 0.6 * plain


def test_estimate_scales_with_layout():
    cfg = load_model_config("qwen35_35b_a3b")
    spec = MemorySpec(micro_batch=1, seq_len=4096, activation_checkpoint="full")
    one = estimate_memory(cfg, Layout(world=8, dp_shard=8), spec)
    more = estimate_memory(cfg, Layout(world=64, dp_shard=64), spec)
    assert more.params_bytes < one.params_bytes / 7
    assert more.optimizer_bytes == 2 * more.params_bytes
    none = estimate_memory(cfg, Layout(world=8, dp_shard=8), with_spec(spec, activation_checkpoint="none"))
    assert none.activations_peak_bytes > one.activations_peak_bytes


def test_smoke_config_passes_the_memory_check():
    assert memory_error(load_config(["experiment=smoke_cpu_text"])) is None


def test_big_model_on_this_machine_stops_with_one_line():
    r = subprocess.run([sys.executable, "-m", "train.main", "experiment=smoke_cpu_text",
                        "model=qwen35_35b_a3b", "train.device_memory_gib=24"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: model=qwen35_35b_a3b")
    assert "estimated peak" in lines[0] and "24.0 GiB" in lines[0] and "ranks" in lines[0]


def test_enumerate_rank_and_format():
    cfg = load_model_config("tiny")
    layouts = enumerate_layouts(cfg, 8, seq_len=128)
    sizes = {(L.tp, L.ep, L.pp, L.dp_shard) for _, L in layouts}
    assert (1, 1, 1, 8) in sizes and (2, 2, 1, 4) in sizes and (1, 8, 1, 8) in sizes
    assert all(L.pp * L.tp * L.dp_shard == 8 for _, L in layouts)
    out = suggest_layouts(cfg, 8, 141, seq_len=128, micro_batch=2)
    assert out and [s.comm_bytes for s in out] == sorted(s.comm_bytes for s in out)
    table = format_table(out, 141, limit=5)
    assert "peak GiB" in table and len(table.splitlines()) == 7   # header, 5 rows, "... more"
    assert all(s.memory.peak_bytes <= 141 * GIB for s in out)
    assert suggest_layouts(cfg, 8, 1e-6, seq_len=128, micro_batch=2) == []
    assert "no layout fits" in format_table([], 1)


def _check_ranks(rank: int, world: int, run_dir: str, overrides: list, out: str) -> None:
    from parallel.layout import validate_layout
    from train.trainer import Trainer

    cfg = load_config(["experiment=smoke_cpu_text", "logging.wandb=disabled", "checkpoint.interval=0",
                       "train.device=cpu", *overrides])
    tr = Trainer(cfg, Path(run_dir) / str(rank))
    tr.train_step()
    ps = list(tr.model.parameters())
    with LiveBytes(ps, grads(ps), optimizer_tensors(tr.optimizer), tr.model.buffers()) as mem:
        tr.train_step()
    layout = validate_layout(cfg.parallel, cfg.model, world, cfg.data.seq_len)
    est = estimate_memory(cfg.model, layout, spec_from_config(cfg, "cpu"), rank=rank)
    Path(out, f"{rank}.txt").write_text(f"{mem.peak} {est.peak_bytes}")


@pytest.mark.parametrize("layout", [["parallel.dp_shard=2"], ["parallel.tp=2"]], ids=["dp2", "tp2"])
def test_estimate_within_15_percent_of_a_gloo_run(tmp_path, layout):
    """The estimate against the peak live bytes of a real 2-rank gloo training step."""
    from tests.distributed import run_ranks

    overrides = ["model=tiny", "data.seq_len=256", "data.batch_size=4", *layout]
    run_ranks(2, _check_ranks, str(tmp_path), overrides, str(tmp_path))
    for rank in range(2):
        measured, est = map(int, (tmp_path / f"{rank}.txt").read_text().split())
        assert abs(est / measured - 1) < 0.15, (rank, measured, est)
