"""The webdataset loader inside the trainer: a tiny VL model trained through `python -m train.main`
on synthetic shards learns its captions; mixture shares and skip counters reach metrics.jsonl;
a resumed run logs what the uninterrupted one logs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from data.format import ShardSink, encode_sample
from data.synthetic import write_synthetic
from train import checkpoint as ckpt
from train.main import load_config
from train.trainer import Trainer

VL = ["model=tiny_vl", "data=webdataset", "data.seq_len=128", "data.batch_size=4",
      "data.image_min_pixels=1024", "data.video_min_pixels=1024", "data.shuffle_buffer=32",
      "train.device=cpu", "train.autocast=none", "train.peak_flops=1e12", "logging.wandb=disabled",
      "train.warmup_steps=5", "data.virtual_streams=8"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests check data and resume logic, not speed: one intra-op thread keeps the tiny
    model's steps in milliseconds also when other jobs load the 2 cores (two threads then spend
    seconds per step waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_main_on_synthetic_shards_learns_captions(tmp_path):
    syn = tmp_path / "syn"
    # A second source with broken samples: the run goes on and reports them.
    sink = ShardSink(str(tmp_path / "bad"))
    for i in range(8):
        sink.write(f"b{i}", encode_sample(f"b{i}", [{"text": f"note {i} " * 20}]))
    sink.write("broken", {"json": b"{oops"})
    sink.close()
    run = tmp_path / "run"
    sources = (f"+data.sources={{syn: {{shards: '{syn}/shard-{{000000..000003}}.tar', weight: 4}}, "
               f"notes: {{shards: '{tmp_path}/bad/*.tar', weight: 1}}}}")
    write_synthetic(str(syn), seed=1234, num_shards=4, docs_per_shard=64)
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", *VL, sources, "data.shards=null", "train.max_steps=40",
         "train.lr=3e-3", "train.log_interval=1", "checkpoint.interval=0",
         "checkpoint.save_final=false", f"run_dir={run}"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = read_metrics(run)
    cap = [r["ce_after_vision"] for r in rows if r.get("ce_after_vision") is not None]
    first, last = sum(cap[:5]) / 5, sum(cap[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    share = {n: sum(r.get(f"data_share/{n}", 0) for r in rows) / len(rows) for n in ("syn", "notes")}
    assert share["syn"] > share["notes"] > 0, share
    assert any(r.get("skipped/invalid_json") == 1 for r in rows)
    assert all("data_wait_s" in r for r in rows)


def test_trainer_resume_on_webdataset_matches_uninterrupted(tmp_path):
    syn = tmp_path / "syn"
    write_synthetic(str(syn), seed=7, num_shards=2, docs_per_shard=32)
    common = VL + [f"data.shards='{syn}/shard-{{000000..000001}}.tar'", "data.num_workers=1",
                   "train.lr_decay_steps=6"]

    def trainer(run, *over):
        return Trainer(load_config(common + [f"run_dir={run}", *over]), run)

    trainer(tmp_path / "full", "train.max_steps=6", "checkpoint.interval=0").fit()
    split = tmp_path / "split"
    trainer(split, "train.max_steps=3", "checkpoint.interval=3").fit()
    assert ckpt.latest_checkpoint(split / "checkpoints").name == "step_00000003"
    trainer(split, "train.max_steps=6", "checkpoint.interval=0").fit()
    a, b = read_metrics(tmp_path / "full"), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "ce_after_vision", "tokens_after_vision", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
