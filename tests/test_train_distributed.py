"""`python -m train.main` under torchrun with gloo ranks on CPU: tensor and context parallelism give
the losses of one process on the same data, and runs resume from sharded checkpoints exactly."""

import json
import os
import subprocess
import sys

import pytest

from tests.distributed import free_port

COMMON = ["experiment=smoke_cpu_text", "model=tiny", "model.mtp_num_layers=1", "data.seq_len=64",
          "data.batch_size=2", "train.device=cpu", "train.autocast=none", "train.warmup_steps=2",
          "train.peak_flops=1e12", "logging.wandb=disabled", "train.log_interval=1",
          "train.lr_decay_steps=6"]


def train(run_dir, nproc: int, *overrides) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "train.main"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "train.main"]
    out = subprocess.run(cmd + COMMON + [f"run_dir={run_dir}", *overrides], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    """4 steps in one process: the reference of the tp and cp runs."""
    return train(tmp_path_factory.mktemp("one"), 1, "train.max_steps=4", "checkpoint.interval=0")


@pytest.mark.parametrize("layout", [pytest.param("parallel.tp=2", id="tp2"),
                                    pytest.param("parallel.cp=2", id="cp2")])
def test_tp_or_cp_run_matches_one_process(tmp_path, layout, one_process):
    """tp=2 or cp=2 ranks read the data one process reads: same losses, grad norms and expert load
    (fp32); under cp each rank runs half of every row's tokens."""
    one = one_process
    two = train(tmp_path / "two", 2, "train.max_steps=4", "checkpoint.interval=0", layout)
    for key in ("loss", "ce", "mtp_ce", "moe_aux", "grad_norm", "expert_load_imbalance"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=2e-5), key
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]


@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.dp_shard=2", "parallel.ep=2"], id="dp2-ep2"),
    pytest.param(["parallel.tp=2"], id="tp2", marks=pytest.mark.slow),  # tests/test_reshard.py too
])
def test_resume_in_the_same_layout_is_exact(tmp_path, layout):
    """6 steps in one go equal 3 steps, a sharded checkpoint, and 3 more."""
    full = train(tmp_path / "full", 2, "train.max_steps=6", "checkpoint.interval=0", *layout)
    split_dir = tmp_path / "split"
    train(split_dir, 2, "train.max_steps=3", "checkpoint.interval=3", *layout)
    split = train(split_dir, 2, "train.max_steps=6", "checkpoint.interval=0", *layout)
    assert [r["step"] for r in split] == list(range(1, 7))
    for key in ("loss", "ce", "mtp_ce", "moe_aux", "grad_norm", "lr", "expert_load_imbalance"):
        assert [r[key] for r in split] == [r[key] for r in full], key
    dp = 2 if "parallel.dp_shard=2" in layout else 1
    assert full[0]["tokens"] == dp * 2 * 64  # data-parallel ranks x batch 2 x 64 tokens


def test_accumulation_under_fsdp_equals_one_large_batch(tmp_path):
    """dp_shard=2: 2 micro-batches of 1 row (gradients reduce-scattered once, after the second)
    log what 1 micro-batch of 2 rows logs. The MoE aux loss is per micro-batch, so it is off here."""
    args = ["train.max_steps=3", "checkpoint.interval=0", "parallel.dp_shard=2",
            "model.router_aux_loss_coef=0", "model.mtp_num_layers=0"]
    big = train(tmp_path / "big", 2, *args, "data.batch_size=2")
    acc = train(tmp_path / "acc", 2, *args, "data.batch_size=1", "train.grad_accum=2")
    for key in ("loss", "ce", "grad_norm"):
        assert [r[key] for r in acc] == pytest.approx([r[key] for r in big], rel=2e-5), key


@pytest.mark.parametrize("schedule", [
    pytest.param(["parallel.pp_schedule=1f1b"], id="1f1b"),
    # tests/test_pipeline.py checks the interleaved schedule against one process in fp64
    pytest.param(["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2"],
                 id="interleaved", marks=pytest.mark.slow),
])
def test_pipeline_run_matches_one_process(tmp_path, schedule):
    """pp=2 runs the 2 micro-batches of a step through the stages: the losses, gradient norm and
    expert load of one process accumulating them."""
    args = ["train.max_steps=3", "checkpoint.interval=0", "train.grad_accum=2"]
    one = train(tmp_path / "one", 1, *args)
    pp = train(tmp_path / "pp", 2, *args, "parallel.pp=2", *schedule)
    for key in ("loss", "ce", "mtp_ce", "moe_aux", "grad_norm", "expert_load_imbalance"):
        assert [r[key] for r in pp] == pytest.approx([r[key] for r in one], rel=2e-5), key
