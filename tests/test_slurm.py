"""launch/slurm.sbatch under a real Slurm (tests/slurm_cluster.py: slurmctld + slurmd + munged on
localhost): a 2-rank CPU run is submitted unchanged, requeued mid-run with `scontrol requeue`
(Slurm's SIGTERM reaches the trainer, which commits a checkpoint after the current step), and the
requeued job resumes from that checkpoint to the end, in the same (offline) wandb run. Skipped, with the reason, where Slurm is not
installed; .ci/run installs it."""

import json
import re
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import free_port
from tests.slurm_cluster import LocalSlurm, unavailable
from train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
STEPS = 80
TRAIN = ["model=tiny", "data.seq_len=64", "data.batch_size=2", "train.device=cpu",
         "train.autocast=none", "train.peak_flops=1e12", "train.warmup_steps=2",
         f"train.max_steps={STEPS}", "checkpoint.interval=0", "logging.wandb=offline"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.endswith("}")]


def test_sbatch_cpu_run_is_requeued_and_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    env = {"NPROC_PER_NODE": "2", "PYTHON": sys.executable,
           "TORCHRUN": str(Path(sys.executable).with_name("torchrun")),
           "RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    job = slurm.sbatch(["--nodes=1", f"--output={out}", str(REPO / "launch" / "slurm.sbatch"),
                        *TRAIN, f"run_dir={run}"], env, cwd=REPO)
    deadline = time.monotonic() + 180
    while len(metric_steps(run)) < 3:
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job} is {state} before step 3:\n{out.read_text() if out.exists() else ''}"
            f"\n{slurm.logs()}")
        assert time.monotonic() < deadline, f"no step 3 in 180 s:\n{out.read_text()}"
        time.sleep(0.2)

    slurm.requeue(job)
    info = slurm.wait_state(job, ENDED, 240)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}\n{slurm.logs()}"
    assert info["Restarts"] == "1"
    stopped = re.search(r"stopped by SIGTERM after step (\d+): checkpoint (\S+) committed", text)
    assert stopped, text
    k = int(stopped.group(1))
    assert 3 <= k < STEPS
    assert Path(stopped.group(2)).name == ckpt.step_dir_name(k)
    assert f"resumed from {run / 'checkpoints' / ckpt.step_dir_name(k)} at step {k}" in text
    assert f"step {STEPS}/{STEPS}" in text
    # Every step logged once: the requeued job starts where the preempted one committed.
    assert metric_steps(run) == list(range(1, STEPS + 1))
    assert [p.name for p in ckpt.committed_checkpoints(run / "checkpoints")] == [
        ckpt.step_dir_name(k), ckpt.step_dir_name(STEPS)]
    # The requeued job continued the preempted job's wandb run. Slurm's SIGTERM also stopped
    # wandb's service in the first job (its buffer lost, the run not finished), so the requeued
    # job sent every step again, in order.
    from tests.wandb_files import wandb_runs

    runs = wandb_runs(run, timeout_s=5)
    run_id = (run / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and runs[1] == (run_id, list(range(1, STEPS + 1)))
    assert runs[0][0] in (run_id, set()) and runs[0][1] == list(range(1, len(runs[0][1]) + 1))
