"""Elastic restart and hangs: a rank killed with SIGKILL mid-run under `torchrun --max-restarts 1`
brings the job back from the last committed checkpoint and the run logs what an uninterrupted run
logs; a collective that one rank never joins fails after the collective timeout with a message
naming it, and the step watchdog says where the waiting rank is."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parallel.collectives import CollectiveError, StepWatchdog
from tests.distributed import run_ranks
from train.metrics import drop_records_after

COMMON = ["experiment=smoke_cpu_text", "model=tiny", "data.seq_len=64", "data.batch_size=2",
          "train.device=cpu", "train.autocast=none", "logging.wandb=disabled", "train.log_interval=1",
          "train.peak_flops=1e12", "checkpoint.interval=2", "train.max_steps=6"]
# Measured, not compared: they differ between any two runs.
TIMING = {"step_time_s", "tokens_per_s", "mfu", "data_wait_s"}


def torchrun(run_dir: Path, max_restarts: int) -> subprocess.Popen:
    """Plain `torchrun --standalone` with 2 gloo ranks, as a user types it: the workers share
    torchrun's store, and parallel/distributed.py's `attempt_store` keeps the attempts apart
    (launch/torchrun.sh would opt out of the sharing instead)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "-m", "train.main", *COMMON, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]  # complete lines only


def worker_pids(agent: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun agent's worker processes (its children), from /proc."""
    out = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:  # exited meanwhile
                continue
            for var in env:
                if var.startswith(b"RANK="):
                    out[int(var[5:])] = int(pid)
    return out


def finish(proc: subprocess.Popen, what: str, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} run failed:\n{out[-6000:]}"
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds worker processes in /proc")
def test_sigkill_of_a_rank_restarts_from_the_last_checkpoint(tmp_path):
    """Rank 1 is killed once step 3 is logged (the step-2 checkpoint is committed; the step-4 one
    may be half-written). torchrun stops rank 0, starts both again, they resume from the latest
    committed checkpoint, and metrics.jsonl ends up as the uninterrupted run's: every step once,
    with the same losses, gradient norms and learning rates."""
    killed_dir, ref_dir = tmp_path / "killed", tmp_path / "uninterrupted"
    killed = torchrun(killed_dir, max_restarts=1)
    ref = torchrun(ref_dir, max_restarts=0)  # alongside: the two share the cores, not their state
    try:
        deadline = time.monotonic() + 240
        while not any(r["step"] >= 3 for r in logged_steps(killed_dir)):
            assert killed.poll() is None, f"ended before step 3 was logged:\n{killed.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "step 3 was never logged"
            time.sleep(0.02)
        os.kill(worker_pids(killed.pid)[1], signal.SIGKILL)
        out = finish(killed, "the killed")
        finish(ref, "the uninterrupted")
    finally:
        for p in (killed, ref):
            if p.poll() is None:
                p.kill()
                p.wait()

    log = (killed_dir / "train.log").read_text()
    assert "resumed from" in log, out[-4000:]  # the second attempt started from a checkpoint
    got, want = logged_steps(killed_dir), logged_steps(ref_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(got, want):
        assert {k: v for k, v in a.items() if k not in TIMING} == \
            {k: v for k, v in b.items() if k not in TIMING}, a["step"]
    assert not list((killed_dir / "checkpoints").glob(".tmp_step_*"))  # leftovers pruned


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _hang_worker(rank: int, world: int) -> None:
    """Rank 1 never joins the vocab-parallel CE (it "hangs" longer than the 3 s timeout); rank 0's
    all-reduce fails naming it, and rank 0's step watchdog (1 s) logged where it was waiting."""
    from parallel.tensor_parallel import VocabParallelCrossEntropy

    if rank == 1:
        time.sleep(4.5)
        return
    handler = _Records()
    logging.getLogger("parallel").addHandler(handler)
    watchdog = StepWatchdog(after_s=1.0, timeout_s=3, poll_s=0.05)
    watchdog.begin("step 7")
    ce = VocabParallelCrossEntropy(group=None, vocab_start=0)
    start = time.monotonic()
    with pytest.raises(CollectiveError) as err:
        ce(torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.long))
    watchdog.close()
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert msg.startswith("collective 'tp all_reduce vocab-parallel CE max' on the world group "
                          "(ranks [0, 1]) did not complete within parallel.collective_timeout_s=3 s"), msg
    assert "a rank died, hangs, or diverged" in msg and "Timed out" in msg, msg
    assert 2.5 < elapsed < 4.5, elapsed
    assert any(line.startswith("step 7 has run ") and "this rank is in collective "
               "'tp all_reduce vocab-parallel CE max' on the world group" in line
               for line in handler.lines), handler.lines


def test_hung_collective_fails_naming_itself():
    run_ranks(2, _hang_worker, timeout_s=3)


def test_resumed_run_drops_the_records_it_will_log_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')  # the torn write of a killed rank 0
    assert drop_records_after(path, 4) == 2
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [1, 2, 3, 4]
    assert drop_records_after(path, 4) == 0
    assert drop_records_after(tmp_path / "absent.jsonl", 0) == 0

