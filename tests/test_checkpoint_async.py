"""Asynchronous checkpoints (checkpoint.async=true): the state of the step that saved, written in the
background while training changes the weights; the same files a synchronous save writes; and a
kill -9 during a save never leaves a checkpoint that looks committed but is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from tests.distributed import run_ranks
from tests.test_checkpoint_trust import FAST
from train import checkpoint as ckpt
from train.checkpoint.hf_dcp import dcp_model_shapes, load_dcp_tensors
from train.main import load_config
from train.trainer import Trainer



def model_state(path) -> dict[str, torch.Tensor]:
    shapes = dcp_model_shapes(path)
    return load_dcp_tensors(path, list(shapes), shapes)


def test_async_run_writes_the_checkpoints_of_a_sync_run(tmp_path):
    runs = {}
    for mode in ("false", "true"):
        run = tmp_path / mode
        Trainer(load_config(FAST + [f"run_dir={run}", "train.max_steps=4", "checkpoint.interval=2",
                                    f"checkpoint.async={mode}"]), run).fit()
        runs[mode] = run / "checkpoints"
    for step in ("step_00000002", "step_00000004"):
        sync, background = model_state(runs["false"] / step), model_state(runs["true"] / step)
        assert sync.keys() == background.keys()
        for k in sync:
            assert torch.equal(sync[k], background[k]), (step, k)
        assert ckpt.verify_checkpoint(runs["true"] / step) == []


def _save_then_change(rank, world, ckpt_dir):
    from model.config import load_model_config
    from parallel.config import ParallelConfig
    from parallel.materialize import materialize
    from parallel.mesh import build_meshes, validate_layout
    from parallel.plan import parallelize
    from tests.meta_build import meta_model
    from train.checkpoint.async_save import AsyncCheckpointer

    cfg = load_model_config("tiny")
    pcfg = ParallelConfig(dp_shard=world)
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=32), "cpu")
    model = parallelize(meta_model(cfg, torch.float32), meshes, pcfg, torch.device("cpu")).model
    materialize(model, "cpu", 0)
    opt = torch.optim.AdamW(model.parameters())
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    saver = AsyncCheckpointer(timeout_s=60)
    saver.save(ckpt_dir, 1, model, opt, {"step": 1}, keep_last=0)
    with torch.no_grad():  # training goes on while the save is written
        for p in model.parameters():
            p.add_(1.0)
    saver.close()
    saved = model_state(ckpt_dir / "step_00000001")  # collective: every rank reads it whole
    for n, w in before.items():
        assert torch.equal(saved[n], w), n


def test_two_rank_async_save_holds_the_staged_state(tmp_path):
    """dp_shard=2: what is written is the weights at the save, not those changed right after."""
    run_ranks(2, _save_then_change, tmp_path / "checkpoints", timeout_s=60)
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_00000001") == []


def test_kill_during_an_async_save_leaves_only_verified_checkpoints(tmp_path):
    """kill -9 while a .tmp_step_N is being written: every directory that looks committed verifies
    and the run resumes from the newest of them."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = FAST + [f"run_dir={run}", "checkpoint.async=true", "checkpoint.interval=1",
                   "checkpoint.keep_last=2", "train.lr_decay_steps=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "train.main", *args, "train.max_steps=1000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # a committed checkpoint exists and the next is in flight
            if ckpt.committed_checkpoints(ckpts) and list(ckpts.glob(".tmp_step_*")):
                break
            assert proc.poll() is None, "the run ended before a save was in flight"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    committed = ckpt.committed_checkpoints(ckpts)
    assert committed
    for path in committed:
        assert ckpt.verify_checkpoint(path) == [], path
    newest = int(committed[-1].name.split("_")[1])
    out = subprocess.run([sys.executable, "-m", "train.main", *args, f"train.max_steps={newest + 1}"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"at step {newest}" in (run / "train.log").read_text()
    assert not list(ckpts.glob(".tmp_step_*"))  # the leftover was cleared by the next commit
