"""wandb across restarts, in offline mode (no network): every start of a run directory continues
the same wandb run (its id in <run_dir>/wandb_run_id) and each step reaches wandb exactly once,
also the steps a resumed run computes again. The offline run files are read back as wandb wrote
them (LevelDB-framed protobuf records)."""

import os
import signal
import subprocess
import time

import pytest

from tests.test_train import make_trainer, read_metrics

wandb = pytest.importorskip("wandb")
from tests.wandb_files import wandb_runs  # noqa: E402


def test_resumed_run_continues_the_same_wandb_run_without_repeating_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run = tmp_path / "run"
    args = ["logging.wandb=offline", "train.lr_decay_steps=7"]
    # Steps 1-5, the last checkpoint at 3: as if killed after step 5 was logged.
    make_trainer(run, *args, "train.max_steps=5", "checkpoint.interval=3",
                 "checkpoint.save_final=false").fit()
    run_id = (run / "wandb_run_id").read_text().strip()
    # Resumes at 3: steps 4 and 5 run again (identical values) and are not sent twice.
    make_trainer(run, *args, "train.max_steps=7", "checkpoint.interval=0").fit()
    assert wandb_runs(run) == [(run_id, [1, 2, 3, 4, 5]), (run_id, [6, 7])]
    # train.resume=never starts another run: a new wandb run, from step 1.
    make_trainer(run, *args, "train.max_steps=2", "train.resume=never").fit()
    new_id = (run / "wandb_run_id").read_text().strip()
    assert new_id != run_id and wandb_runs(run)[-1] == (new_id, [1, 2])


def _stop_wandb_service():
    """SIGTERM to wandb's service process, as Slurm signals every process of a job step."""
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "wandb"], capture_output=True,
                         text=True).stdout.split()
    assert out, "no wandb service process found"
    for pid in out:
        os.kill(int(pid), signal.SIGTERM)


def test_wandb_failing_mid_run_neither_stops_training_nor_loses_steps(tmp_path, monkeypatch):
    """The service stops before step 4 (a preemption's SIGTERM): the run trains on, metrics.jsonl
    has every step, and the next start sends wandb every step its first attempt may have lost."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run = tmp_path / "run"
    args = ["logging.wandb=offline", "train.lr_decay_steps=8"]
    t = make_trainer(run, *args, "train.max_steps=6", "checkpoint.interval=4",
                     "checkpoint.save_final=false")
    step = t.train_step

    def step_after_stopping_wandb():
        if t.step == 3:
            _stop_wandb_service()
            time.sleep(1)
        return step()

    t.train_step = step_after_stopping_wandb
    t.fit()
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))
    make_trainer(run, *args, "train.max_steps=8", "checkpoint.interval=0").fit()
    runs = wandb_runs(run, timeout_s=5)  # the stopped service wrote no exit record
    run_id = (run / "wandb_run_id").read_text().strip()
    assert runs[1][0] == run_id and runs[0][0] in (run_id, set())  # set(): nothing was flushed
    # What the stopped service had not flushed is lost, and the first attempt confirmed nothing:
    # the second sends every step, in order (a resumed wandb run keeps the first value of a step).
    assert runs[1][1] == list(range(1, 9))
    assert runs[0][1] == list(range(1, len(runs[0][1]) + 1))
