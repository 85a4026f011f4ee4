"""The single-process trainer: exact resume, atomic keep-last-k checkpoints, accumulation,
schedules, decay groups, non-finite steps, and the CLI smoke run."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from train import checkpoint as ckpt
from train.config import TrainConfig
from train.main import load_config
from train.optim import build_optimizer, lr_factor
from train.preempt import Stopped
from train.trainer import Trainer

FAST = ["model=tiny", "model.mtp_num_layers=1", "model.router_bias_balancing=true",
        "data.seq_len=64", "data.batch_size=2", "train.device=cpu", "train.autocast=none",
        "train.warmup_steps=2", "train.peak_flops=1e12", "logging.wandb=disabled"]


def make_trainer(run_dir, *overrides):
    return Trainer(load_config(FAST + [f"run_dir={run_dir}", *overrides]), run_dir)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_identical_losses(tmp_path):
    """N steps, then a resumed run to 2N, logs what one 2N-step run logs, at every step. The
    schedule's horizon is fixed (lr_decay_steps) so that max_steps may change between the runs."""
    n = 3
    horizon = f"train.lr_decay_steps={2 * n}"
    full = tmp_path / "full"
    make_trainer(full, horizon, f"train.max_steps={2 * n}", "checkpoint.interval=0").fit()

    split = tmp_path / "split"
    make_trainer(split, horizon, f"train.max_steps={n}", f"checkpoint.interval={n}").fit()
    assert ckpt.latest_checkpoint(split / "checkpoints").name == f"step_{n:08d}"
    make_trainer(split, horizon, f"train.max_steps={2 * n}", "checkpoint.interval=0",
                 "train.resume=auto").fit()

    a, b = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 2 * n + 1))
    for key in ("loss", "ce", "mtp_ce", "moe_aux", "grad_norm", "lr", "expert_load_imbalance"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def _signal_during_step(trainer, at_step, signum):
    """Deliver `signum` to this process at the start of step `at_step` (as Slurm's SIGTERM lands)."""
    step = trainer.train_step

    def signalled_step():
        if trainer.step + 1 == at_step:
            os.kill(os.getpid(), signum)
        return step()

    trainer.train_step = signalled_step


def test_signals_checkpoint_after_the_step_and_resume_is_exact(tmp_path):
    """SIGINT during step 2 and SIGTERM during step 4 each finish that step, commit a checkpoint
    there (no periodic ones: checkpoint.interval=0) and stop; resuming twice logs what one
    uninterrupted run logs."""
    args = ["train.lr_decay_steps=6", "train.max_steps=6", "checkpoint.interval=0"]
    full = tmp_path / "full"
    make_trainer(full, *args).fit()
    split = tmp_path / "split"
    for signum, at in ((signal.SIGINT, 2), (signal.SIGTERM, 4)):
        t = make_trainer(split, *args)
        _signal_during_step(t, at, signum)
        with pytest.raises(Stopped, match=f"stopped by {signum.name} after step {at}") as e:
            t.fit()
        assert e.value.signum == signum and e.value.step == at
        assert ckpt.latest_checkpoint(split / "checkpoints").name == ckpt.step_dir_name(at)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    make_trainer(split, *args).fit()
    a, b = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_finite_data_ends_the_run_cleanly_with_a_final_checkpoint(tmp_path, caplog):
    """data.num_docs runs out long before train.max_steps: the run ends at the last full step,
    commits a checkpoint there and says why (it raised a bare StopIteration)."""
    run = tmp_path / "finite"
    t = make_trainer(run, "data.num_docs=12", "train.max_steps=1000", "checkpoint.interval=0",
                     "train.grad_accum=2")
    with caplog.at_level("WARNING", logger="train"):
        history = t.fit()
    n = len(history)
    assert 0 < n < 1000 and t.step == n
    assert [p.name for p in ckpt.committed_checkpoints(run / "checkpoints")] == [ckpt.step_dir_name(n)]
    assert (f"the data ran out before step {n + 1} of train.max_steps=1000 (data.epochs=None, "
            f"data.num_docs=12): ending the run at step {n} with a final checkpoint") in caplog.text


def test_checkpoints_are_committed_atomically_and_pruned(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, "train.max_steps=4", "checkpoint.interval=1", "checkpoint.keep_last=2").fit()
    d = run / "checkpoints"
    assert [p.name for p in ckpt.committed_checkpoints(d)] == ["step_00000003", "step_00000004"]
    assert all((p / ckpt.MARKER).exists() for p in ckpt.committed_checkpoints(d))
    # A crash mid-write leaves a temporary dir, or a step dir without the marker: never resumed from.
    (d / ".tmp_step_00000009").mkdir()
    (d / "step_00000008").mkdir()
    assert ckpt.latest_checkpoint(d).name == "step_00000004"
    t = make_trainer(run, "train.max_steps=5", "checkpoint.interval=0")
    t.restore()
    assert t.step == 4


def test_resume_from_missing_checkpoint_is_an_error(tmp_path):
    t = make_trainer(tmp_path / "r", f"train.resume={tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="train.resume"):
        t.restore()


def test_init_from_takes_weights_only(tmp_path):
    src = tmp_path / "src"
    make_trainer(src, "train.max_steps=2", "checkpoint.interval=0").fit()
    path = ckpt.latest_checkpoint(src / "checkpoints")
    t = make_trainer(tmp_path / "dst", f"train.init_from={path}", "train.max_steps=2")
    t.restore()
    ref = make_trainer(tmp_path / "ref", "train.resume=never")
    ref.restore()
    assert t.step == 0
    saved = {k: v.clone() for k, v in t.model.state_dict().items()}
    ckpt.load_checkpoint(path, ref.model, ref.optimizer)
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(saved[k], v)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """Token-weighted accumulation reproduces the large batch's CE gradients. The MoE balancing
    loss is a product of batch means and MTP has its own token count, so both are per micro-batch
    by design (as in Megatron) and are switched off here."""
    exact = ["model.router_aux_loss_coef=0", "model.mtp_num_layers=0", "train.max_steps=1"]
    big = make_trainer(tmp_path / "a", "data.batch_size=4", *exact)
    acc = make_trainer(tmp_path / "b", "data.batch_size=2", "train.grad_accum=2", *exact)
    ra, rb = big.train_step(), acc.train_step()
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    # The (clipped) gradients the optimizer used are still in .grad after the step.
    for (n, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    t = make_trainer(tmp_path / "nan", "train.max_consecutive_bad_steps=2", "train.max_steps=5")
    with torch.no_grad():
        t.model.lm_head.weight[0, 0] = float("nan")
    before = t.model.embed_tokens.weight.clone()
    r = t.train_step()
    assert r["skipped_steps"] == 1 and not math.isfinite(r["loss"])
    torch.testing.assert_close(t.model.embed_tokens.weight, before)  # no update applied
    with pytest.raises(RuntimeError, match="2 consecutive steps with non-finite"):
        t.train_step()


def test_schedules():
    cos = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos) == pytest.approx(0.1)
    assert lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(55, cos) == pytest.approx(0.55)
    assert lr_factor(100, cos) == pytest.approx(0.1)
    wsd = TrainConfig(max_steps=100, warmup_steps=10, schedule="wsd", wsd_decay_fraction=0.2,
                      min_lr_ratio=0.0)
    assert [lr_factor(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(89, wsd) == pytest.approx(0.5)
    assert lr_factor(99, wsd) == pytest.approx(0.0)


def test_weight_decay_groups(tiny_cfg):
    from model.language_model import Qwen35LM

    model = Qwen35LM(tiny_cfg)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    for n in no_decay:
        assert n.endswith(("A_log", "dt_bias", "bias")) or "norm" in n
    assert "layers.0.linear_attn.A_log" in no_decay and "layers.0.linear_attn.dt_bias" in no_decay
    assert "layers.0.input_layernorm.weight" in no_decay
    assert "layers.0.mlp.experts.gate_up_proj" in decay and "lm_head.weight" in decay
    assert len(decay) + len(no_decay) == len(names)


def test_cli_smoke_run_learns(tmp_path):
    run = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", "experiment=smoke_cpu_text", f"run_dir={run}",
         "train.max_steps=30", "train.warmup_steps=5", "data.seq_len=128", "data.batch_size=4",
         "train.log_interval=1", "checkpoint.interval=15", "logging.wandb=disabled"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_metrics(run)
    assert len(records) == 30
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "moe_aux", "moe_z",
                "mtp_ce", "expert_load_imbalance"):
        assert key in records[-1], key
    assert records[-1]["loss"] < records[0]["loss"] - 2.0
    assert (run / "config.yaml").exists()
    assert [p.name for p in ckpt.committed_checkpoints(run / "checkpoints")] == [
        "step_00000015", "step_00000030"]
    assert "step 30/30" in proc.stdout


def test_vision_tower_lr_scale():
    from model.config import load_model_config
    from model.language_model import Qwen35LM

    model = Qwen35LM(load_model_config("tiny_vl"))
    opt = build_optimizer(model, TrainConfig(lr=1e-3, vision_lr_scale=0.1))
    vision = {id(p) for p in model.visual.parameters()}
    for group in opt.param_groups:
        in_vision = {id(p) in vision for p in group["params"]}
        assert len(in_vision) == 1  # a group is all vision or all language
        assert group["lr"] == pytest.approx(1e-4 if in_vision.pop() else 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
