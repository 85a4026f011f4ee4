"""Start-up checks and disks: every path the run reads, and the directories it writes, are checked
before anything is built, with one line; a full disk says so; a crashed save's leftovers are
removed at start-up so that a restart after freeing space works."""

import logging
import os
import subprocess

import pytest

from train import checkpoint as ckpt
from train.checkpoint import save_load
from train.main import main
from train.trainer import Trainer

FAST = ["model=tiny", "data.seq_len=64", "data.batch_size=2", "train.device=cpu",
        "train.autocast=none", "train.warmup_steps=1", "train.peak_flops=1e12",
        "logging.wandb=disabled", "train.max_steps=1"]


@pytest.fixture
def no_trainer(monkeypatch):
    """main() must stop before the trainer (model, process group) is built."""
    def refuse(*a, **k):
        raise AssertionError("the trainer was built")
    monkeypatch.setattr("train.trainer.Trainer", refuse)


@pytest.fixture
def root_logging():
    """main() adds handlers to the root logger: take them away again."""
    root = logging.getLogger()
    before = list(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if h not in before[0]:
            root.removeHandler(h)
            h.close()
    root.setLevel(before[1])


def start_error(capsys, *overrides) -> str:
    assert main([*FAST, *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_unwritable_directories_fail_at_start(tmp_path, capsys, no_trainer):
    (tmp_path / "file").write_text("")
    err = start_error(capsys, f"run_dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'file' / 'ck'}")
    assert err.startswith(f"config error: checkpoint.dir='{tmp_path / 'file' / 'ck'}': cannot write there")
    err = start_error(capsys, f"run_dir={tmp_path / 'file' / 'run'}")
    assert err.startswith(f"config error: run_dir='{tmp_path / 'file' / 'run'}': cannot write there")


@pytest.mark.parametrize("override,expected", [
    ("data=webdataset data.shards={d}/shard-{{000000..000001}}.tar", "shard '{d}/shard-000000.tar' does not exist"),
    ("data=webdataset data.shards={d}/*.tar", "the glob '{d}/*.tar' matches no file"),
    ("data=webdataset data.shards={d}", "shard '{d}' is not a readable file"),
    ("data.tokenizer={d}/tokenizer.json", "data.tokenizer='{d}/tokenizer.json': no such file"),
    ("train.resume={d}/step_00000005", "train.resume='{d}/step_00000005': not a committed checkpoint (no such directory)"),
    ("train.resume={d}", "train.resume='{d}': not a committed checkpoint (no COMMITTED file in it)"),
    ("train.init_from={d}/ckpt", "train.init_from='{d}/ckpt': not a checkpoint (no such directory)"),
])
def test_missing_inputs_fail_before_the_model_is_built(tmp_path, capsys, no_trainer, override, expected):
    d = tmp_path / "in"
    d.mkdir()
    err = start_error(capsys, f"run_dir={tmp_path / 'run'}", *override.format(d=d).split())
    assert err.startswith("config error: ") and expected.format(d=d) in err


def test_bad_tokenizer_file_is_one_line(tmp_path, capsys, no_trainer):
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{not json")
    err = start_error(capsys, f"run_dir={tmp_path / 'run'}", f"data.tokenizer={tok}")
    assert f"data.tokenizer='{tok}': cannot be loaded" in err


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB filesystem (tmpfs), so that writes fail with ENOSPC as on a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave_bytes, name="filler"):
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / name).write_bytes(b"\0" * max(free - leave_bytes, 0))


def test_full_disk_says_so_and_a_restart_after_freeing_space_works(tmp_path, small_disk, capsys,
                                                                    root_logging, monkeypatch):
    ck = small_disk / "ck"
    args = [*FAST, f"run_dir={tmp_path / 'run'}", f"checkpoint.dir={ck}"]
    from train.main import load_config

    # 1. Not enough space before the save: refused before writing, with sizes and what to do.
    fill(small_disk, 1 << 20)
    t = Trainer(load_config(args), tmp_path / "run")
    with pytest.raises(ckpt.DiskFullError, match=rf"checkpoint of step 1 does not fit in {ck}: "
                                                 r"about [\d.]+ MiB needed, [\d.]+ MiB free"):
        t.fit()
    assert not list(ck.glob(".tmp_step_*")) and not ckpt.committed_checkpoints(ck)
    (small_disk / "filler").unlink()

    # 2. The disk fills up while the save writes (another process): torch's writer fails with
    # "unexpected pos ..."; the error still names the full disk, and the partial save is removed.
    real_save = save_load.dcp.save

    def save_while_filling(*a, **k):
        fill(small_disk, 64 << 10, "other_process")
        return real_save(*a, **k)

    monkeypatch.setattr(save_load.dcp, "save", save_while_filling)
    t = Trainer(load_config(args), tmp_path / "run")
    with pytest.raises(ckpt.DiskFullError, match=r"does not fit .*\(the write failed: "):
        t.fit()
    assert not list(ck.glob(".tmp_step_*"))
    monkeypatch.setattr(save_load.dcp, "save", real_save)
    (small_disk / "other_process").unlink()

    # 3. A save cut off by a crash (kill -9) holds most of the disk: the restart removes it first.
    stale = ck / ".tmp_step_00000007"
    stale.mkdir(parents=True)
    fill(ck, 1 << 20, ".tmp_step_00000007/__0_0.distcp")
    assert main(args) == 0
    assert not stale.exists()
    assert [p.name for p in ckpt.committed_checkpoints(ck)] == ["step_00000001"]


def test_full_disk_is_one_line_from_the_cli(tmp_path, small_disk, capsys, root_logging):
    fill(small_disk, 1 << 20)
    assert main([*FAST, f"run_dir={tmp_path / 'run'}", f"checkpoint.dir={small_disk / 'ck'}"]) == 1
    out = capsys.readouterr().out
    assert "ERROR train: checkpoint of step 1 does not fit in" in out
    assert "Traceback" not in out
