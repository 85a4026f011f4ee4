"""The launchers' dry runs print, per node, the exact command that node runs (rendezvous on the
first node, overrides passed through with their quoting), and the real paths run those commands."""

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARDS = "data.shards=DIR/shard-{000000..000009}.tar"   # as the shell hands it over, quotes stripped
OVERRIDES = ["experiment=smoke_cpu_text", "data=webdataset", "parallel.tp=2", SHARDS, "run_dir=/tmp/a b"]
TRAIN = ["--module", "train.main", *OVERRIDES]


def launch(script, *args, env=None, check=True):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "RDZV_", "NPROC_PER_NODE",
                                  "LOG_DIR", "DRY_RUN", "WORLD_SIZE", "RUN_DIR", "MAX_RESTARTS"))}
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True,
                          text=True, env={**clean, "TORCHRUN": "torchrun", **(env or {})}, cwd="/")
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def node_lines(out):
    """{label: argv} of the '[label] command' lines of a dry run."""
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    return {ln[1:ln.index("]")]: shlex.split(ln[ln.index("]") + 2:]) for ln in lines}


def test_torchrun_one_node_dry_run():
    out = launch("torchrun.sh", "--dry-run", *OVERRIDES, env={"NPROC_PER_NODE": "8"}).stdout
    assert ("[node 0] torchrun --standalone --nproc-per-node 8 --max-restarts 0 --module train.main "
            "experiment=smoke_cpu_text data=webdataset parallel.tp=2 data.shards='DIR/shard-{000000..000009}.tar' "
            "run_dir='/tmp/a b'") in out
    assert node_lines(out) == {"node 0": ["torchrun", "--standalone", "--nproc-per-node", "8",
                                          "--max-restarts", "0", *TRAIN]}
    assert launch("torchrun.sh", *OVERRIDES, env={"NPROC_PER_NODE": "8", "DRY_RUN": "1"}).stdout == out


def test_torchrun_two_nodes_dry_run():
    env = {"NNODES": "2", "NODE_RANK": "1", "RDZV_ENDPOINT": "node01:29500", "NPROC_PER_NODE": "4",
           "MAX_RESTARTS": "3", "LOG_DIR": "/logs"}
    nodes = node_lines(launch("torchrun.sh", "--dry-run", *OVERRIDES, env=env).stdout)
    assert list(nodes) == ["node 0", "node 1, this node"]
    for n, argv in enumerate(nodes.values()):
        assert argv == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "node01:29500", "--rdzv-id", "qwen35-pretrain",
                        "--max-restarts", "3", "--log-dir", f"/logs/node{n}", "--tee", "3", *TRAIN]
    proc = launch("torchrun.sh", "--dry-run", "x=1", env={"NNODES": "2"}, check=False)
    assert proc.returncode == 2 and "needs RDZV_ENDPOINT" in proc.stderr


SLURM_ENV = {"SLURM_JOB_NODELIST": "node[01-04]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_PER_NODE": "h100:8", "RUN_DIR": "/runs/r"}


def test_slurm_four_nodes_dry_run():
    out = launch("slurm.sbatch", *OVERRIDES, env={**SLURM_ENV, "DRY_RUN": "1"}).stdout
    assert "localhost" not in out
    nodes = node_lines(out)
    assert list(nodes) == [f"node0{n + 1} NODE_RANK={n}" for n in range(4)]
    for n, argv in enumerate(nodes.values()):
        assert argv == ["torchrun", "--log-dir", f"/runs/r/logs/slurm-4242/node{n}", "--tee", "3",
                        "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "node01:29500", "--rdzv-id", "4242", "--max-restarts", "0",
                        *TRAIN]
    srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun and "data.shards='DIR/shard-{000000..000009}.tar'" in srun
    port = launch("slurm.sbatch", "--dry-run", "x=1",
                  env={**SLURM_ENV, "RDZV_PORT": "6000", "SLURM_JOB_NODELIST": "gpu[7,9]",
                       "SLURM_NNODES": "2"}).stdout
    assert "--rdzv-endpoint gpu7:6000" in port and "[gpu9 NODE_RANK=1]" in port
    bad = launch("slurm.sbatch", "--dry-run", "x=1", env={**SLURM_ENV, "SLURM_NNODES": "3"}, check=False)
    assert bad.returncode == 2 and "names 4 nodes" in bad.stderr


def test_cpu_dry_run():
    out = launch("cpu.sh", "--dry-run", "4", *OVERRIDES, env={"OMP_NUM_THREADS": "1"}).stdout
    assert node_lines(out) == {"node 0": ["env", "OMP_NUM_THREADS=1", "torchrun", "--standalone",
                                          "--nproc-per-node", "4", "--module", "train.main",
                                          "train.device=cpu", *OVERRIDES]}
    assert launch("cpu.sh", "experiment=x", check=False).returncode == 2  # no process count


# srun's options before the program, as srun parses them: `--opt=value` or a bare flag; a value
# after a space would be the program (`--kill-on-bad-exit 1` runs a program named "1").
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 != bash ]]; do
  if [[ ! $1 =~ ^--[a-z-]+=[^=]+$ ]]; then echo "srun: $1: not --option=value: would run it" >&2; exit 99; fi
  shift
done
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || exit; done
"""
# The cluster's resolver: node names resolve, others do not; on node BAD_RESOLVER_NODE nothing.
FAKE_GETENT = ('#!/usr/bin/env bash\n[[ -n ${BAD_RESOLVER_NODE:-} && ${SLURM_NODEID:-} == "$BAD_RESOLVER_NODE" ]] && exit 2\n'
               '[[ $2 == node* || $2 == gpu* ]] && echo "10.0.0.1 $2" || exit 2\n')


def _fake_bin(tmp_path):
    """A torchrun that records its argv, an srun that runs its command once per node, a getent."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "getent").write_text(FAKE_GETENT)
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TORCHRUN": str(bin_dir / "torchrun")}


def _calls(tmp_path):
    return [json.loads(ln) for ln in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_slurm_runs_on_every_node_what_the_dry_run_prints(tmp_path):
    env = {**SLURM_ENV, **_fake_bin(tmp_path), "RUN_DIR": str(tmp_path / "run")}
    dry = node_lines(launch("slurm.sbatch", "--dry-run", *OVERRIDES, env=env).stdout)
    launch("slurm.sbatch", *OVERRIDES, env=env)
    assert _calls(tmp_path) == [argv[1:] for argv in dry.values()]
    assert (tmp_path / "run" / "logs" / "slurm-4242").is_dir()


def test_slurm_unresolvable_rendezvous_host_fails_at_once(tmp_path):
    env = {**SLURM_ENV, **_fake_bin(tmp_path), "RUN_DIR": str(tmp_path / "run"),
           "RDZV_HOST": "no-such-host.invalid"}
    bad = launch("slurm.sbatch", *OVERRIDES, env=env, check=False)
    assert bad.returncode == 2
    assert "the rendezvous host 'no-such-host.invalid' does not resolve" in bad.stderr
    assert not (tmp_path / "calls.jsonl").exists()  # torchrun never started


def test_slurm_node_that_cannot_resolve_the_rendezvous_host_stops_the_job(tmp_path):
    """Node 2's resolver differs: it says so and exits before torchrun, and srun (with
    --kill-on-bad-exit=1) ends the job instead of the others waiting in the rendezvous."""
    env = {**SLURM_ENV, **_fake_bin(tmp_path), "RUN_DIR": str(tmp_path / "run"),
           "BAD_RESOLVER_NODE": "2"}
    bad = launch("slurm.sbatch", *OVERRIDES, env=env, check=False)
    assert bad.returncode == 2
    assert "node 2 (" in bad.stderr and "cannot resolve the rendezvous host node01" in bad.stderr
    assert len(_calls(tmp_path)) == 2  # nodes 0 and 1 started; the fake srun stops at node 2


def test_slurm_cpu_allocation_needs_no_gpu_options(tmp_path):
    """No GPU in the allocation: one CPU process per node, not an error; NPROC_PER_NODE sets more.
    The script asks Slurm for no GPU itself (GPUs go on the sbatch line)."""
    header = (REPO / "launch" / "slurm.sbatch").read_text().split("\nset -euo")[0]
    assert "#SBATCH --gpus" not in header and "#SBATCH --gres" not in header
    env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_GPUS_PER_NODE"}
    env.update(_fake_bin(tmp_path), CUDA_VISIBLE_DEVICES="", SLURM_CPUS_ON_NODE="16")
    out = launch("slurm.sbatch", "--dry-run", *OVERRIDES, env=env)
    assert "1 CPU process per node" in out.stderr
    assert all(argv[argv.index("--nproc-per-node") + 1] == "1" for argv in node_lines(out.stdout).values())
    assert "--cpus-per-task=16" in out.stdout
    out = launch("slurm.sbatch", "--dry-run", *OVERRIDES, env={**env, "NPROC_PER_NODE": "2"}).stdout
    assert all(argv[argv.index("--nproc-per-node") + 1] == "2" for argv in node_lines(out).values())


def test_cpu_checks_the_config_then_runs_the_printed_command(tmp_path):
    env = {**_fake_bin(tmp_path), "OMP_NUM_THREADS": "1"}
    args = ["2", "experiment=smoke_cpu_text", "data=webdataset", SHARDS, f"run_dir={tmp_path / 'run'}"]
    dry = node_lines(launch("cpu.sh", "--dry-run", *args, env=env).stdout)
    launch("cpu.sh", *args, env=env)
    assert _calls(tmp_path) == [dry["node 0"][3:]]
    bad = launch("cpu.sh", "2", "experiment=smoke_cpu_text", "parallel.tp=3", env=env, check=False)
    assert bad.returncode == 2
    assert "config error: parallel.tp=3: must divide model.num_attention_heads=4" in bad.stderr
    assert len(_calls(tmp_path)) == 1  # nothing was started


@pytest.mark.parametrize("script", ["torchrun.sh", "cpu.sh", "slurm.sbatch"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0
