"""Checkpoints that can be trusted: checksums in every commit record, verified on resume; a damaged
newest checkpoint falls back to the newest good one, naming the bad file; non-finite weights are
never committed; keep_last spares the last checkpoint before a run of skipped steps; a resume into
another model is refused, naming the parameter, and leaves the run directory as it was."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

from train import checkpoint as ckpt
from train.main import load_config
from train.trainer import Trainer

FAST = ["model=tiny", "data.seq_len=32", "data.batch_size=1", "train.device=cpu", "train.autocast=none",
        "train.warmup_steps=1", "train.peak_flops=1e12", "logging.wandb=disabled",
        "train.lr_decay_steps=8"]


def make_trainer(run_dir, *overrides) -> Trainer:
    return Trainer(load_config(FAST + [f"run_dir={run_dir}", *overrides]), run_dir)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with committed checkpoints of steps 1 and 2."""
    run = tmp_path_factory.mktemp("run")
    make_trainer(run, "train.max_steps=2", "checkpoint.interval=1").fit()
    return run


def test_commit_record_holds_every_file_checksum(two_checkpoints):
    path = two_checkpoints / "checkpoints" / "step_00000002"
    record = json.loads((path / ckpt.MARKER).read_text())
    assert record["step"] == 2 and record["algorithm"] == "crc32"
    assert set(record["files"]) == {".metadata", "__0_0.distcp"}
    assert record["files"]["__0_0.distcp"]["bytes"] == (path / "__0_0.distcp").stat().st_size
    assert ckpt.verify_checkpoint(path) == []


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


DAMAGE = {
    "truncated_distcp": ("__0_0.distcp", _truncate, "truncated"),
    "zero_length_distcp": ("__0_0.distcp", lambda p: p.write_bytes(b""), "zero-length"),
    "garbage_metadata": (".metadata", lambda p: p.write_bytes(b"garbage" * 100), "bytes"),
    "flipped_tensor_byte": ("__0_0.distcp", _flip, "its bytes changed"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(kind, two_checkpoints, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    name, damage, words = DAMAGE[kind]
    damage(run / "checkpoints" / "step_00000002" / name)
    t = make_trainer(run, "train.max_steps=2")
    with caplog.at_level(logging.INFO):
        t.restore()
    assert t.step == 1
    line = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert "step_00000002" in line and name in line and words in line, line
    assert "falling back" in line
    # Moved aside, not deleted, and no longer a committed checkpoint.
    assert (run / "checkpoints" / "damaged_step_00000002" / name).exists()
    assert [p.name for p in ckpt.committed_checkpoints(run / "checkpoints")] == ["step_00000001"]


def test_explicit_resume_of_a_damaged_checkpoint_names_the_file(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    bad = run / "checkpoints" / "step_00000002"
    _flip(bad / "__0_0.distcp")
    t = make_trainer(run, f"train.resume={bad}")
    with pytest.raises(ValueError, match=r"damaged: __0_0.distcp: crc32"):
        t.restore()


def test_record_without_checksums_is_resumed_unverified(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    (run / "checkpoints" / "step_00000002" / ckpt.MARKER).write_text("2\n")  # the old format
    t = make_trainer(run, "train.max_steps=2")
    t.restore()
    assert t.step == 2


def test_non_finite_weights_are_never_committed(tmp_path):
    import torch

    t = make_trainer(tmp_path, "train.max_steps=1")
    t.restore()
    with torch.no_grad():
        t.model.norm.weight[0] = float("inf")
    assert t.save() is None
    assert ckpt.committed_checkpoints(tmp_path / "checkpoints") == []


def test_keep_last_spares_the_last_checkpoint_before_skipped_steps(tmp_path):
    """keep_last=1 with a save every step; steps 3-4 are not finite (skipped) and 5-6 recover:
    step 2 (the last one before the streak) is still there, marked KEEP."""
    t = make_trainer(tmp_path, "train.max_steps=6", "checkpoint.interval=1", "checkpoint.keep_last=1")
    step = t.runner.step

    def poisoned(batches, total):
        sums, modality = step(batches, total)
        if t.step + 1 in (3, 4):
            sums = dict(sums, loss=math.nan)
        return sums, modality

    t.runner.step = poisoned
    t.fit()
    names = [p.name for p in ckpt.committed_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000002", "step_00000006"]
    assert (tmp_path / "checkpoints" / "step_00000002" / ckpt.KEEP).exists()


def test_resume_into_another_model_is_refused_and_leaves_the_run_dir(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*"))
              if p.is_file() and p.name != "train.log"}
    t = make_trainer(run, "train.max_steps=4", "model.num_layers=2")
    with pytest.raises(ValueError, match=r"model\.layers\.2\..* that this model does not have"):
        t.fit()
    after = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*"))
             if p.is_file() and p.name != "train.log"}
    assert after == before  # config.yaml, metrics.jsonl and the checkpoints as they were
