"""A real one-node Slurm cluster on localhost for the launcher tests: munged with its own key and
socket, a minimal slurm.conf, slurmctld and slurmd, all under one temporary directory, on free
ports, so it touches no system configuration and runs beside nothing else. Needs Debian's
`slurm-wlm` and `munge` packages (.ci/run installs them) and root (slurmd starts jobs as any user).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests.distributed import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def unavailable() -> Optional[str]:
    """Why a local cluster cannot start here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm/munge not installed ({', '.join(missing)} missing): "
                f"apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        return "slurmd needs root to start jobs"
    return None


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- daemons -------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "LocalSlurm":
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        # -f: munged refuses group-writable parents such as /tmp otherwise.
        self._run(["munged", "-f", f"--socket={r / 'munge.sock'}", f"--key-file={key}",
                   f"--log-file={r / 'log/munged.log'}", f"--pid-file={r / 'munged.pid'}",
                   f"--seed-file={r / 'munged.seed'}"])
        self.conf.write_text(self._slurm_conf())
        self._run(["slurmctld", "-f", str(self.conf)])
        self._run(["slurmd", "-f", str(self.conf)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self._run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the local Slurm node did not become idle in {timeout:.0f} s "
                           f"(state {state!r}); logs:\n{self.logs()}")

    def _slurm_conf(self) -> str:
        r = self.root
        # This machine's node line as slurmd sees it (CPUs, sockets, memory), without UpTime.
        node = self._run(["slurmd", "-C"]).stdout.splitlines()[0]
        node = re.sub(r"\s*UpTime=\S+", "", node)
        name = re.match(r"NodeName=(\S+)", node).group(1)
        return "\n".join([
            "ClusterName=ci", f"SlurmctldHost={name}(127.0.0.1)",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={r / 'munge.sock'}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}", f"SlurmdLogFile={r / 'log/slurmd.log'}",
            # No cgroups: containers (and gVisor) rarely grant them.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin", "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
            "KillWait=30",  # Slurm's default: SIGTERM, then SIGKILL 30 s later
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (each by its pid file)."""
        if self.conf.exists():
            self._run(["scancel", "--full", "--user", "root"], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.root / f"{name}.pid"
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(out)

    # ---- jobs ----------------------------------------------------------------------------------

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> str:
        """Submit; -> the job id."""
        proc = self._run(["sbatch", "--parsable", *args], env={**self.env, **env}, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s: "
                           f"{info.get('JobState')} ({info.get('Reason')})")

    def requeue(self, job_id: str) -> None:
        """`scontrol requeue`, then make the job eligible now: Slurm holds a requeued batch job
        back for about two minutes (its BeginTime), which a test need not wait out."""
        self._run(["scontrol", "requeue", job_id])
        self.wait_state(job_id, ("PENDING",), 60)
        self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def _run(self, cmd: list[str], check: bool = True, env=None, cwd=None):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env, cwd=cwd,
                              timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
