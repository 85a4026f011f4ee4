"""HF directory -> training under tp=2 straight from it (train.init_from_hf, model=from_hf) -> export
of the sharded checkpoint -> transformers loads it strictly, with its tokenizer, and generates; the
export holds the trained weights exactly, and transformers' logits equal the project's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_fixtures import rel_err, save_hf_model, text_batch
from model.hf import logits
from tests.distributed import free_port
from train.checkpoint.hf_cli import main as hf_cli
from train.checkpoint.hf_convert import load_pretrained
from train.checkpoint.hf_dcp import dcp_model_shapes, load_dcp_tensors

transformers = pytest.importorskip("transformers")


def test_train_from_hf_under_tp_then_export_loads_and_generates(tmp_path):
    src, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
    hf = save_hf_model("qwen3_5_moe", src, max_shard_size="200KB")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "train.main",
           "experiment=smoke_cpu_text", "model=from_hf", f"train.init_from_hf={src}", "parallel.tp=2",
           "data.seq_len=64", "data.batch_size=2", "train.device=cpu", "train.autocast=none",
           "train.peak_flops=1e12", "logging.wandb=disabled", "train.max_steps=2",
           "train.warmup_steps=1", "checkpoint.interval=2", f"run_dir={run}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "initialised weights from" in log and "this rank read" in log

    step = run / "checkpoints" / "step_00000002"
    assert hf_cli(["export", "--ckpt", str(step), "--out", str(out)]) == 0
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).exists(), f
    # The dtype of the imported checkpoint (transformers saved the fixture in float32).
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"

    # The export holds the trained (sharded) checkpoint's weights exactly.
    ours = load_pretrained(out)
    shapes = dcp_model_shapes(step)
    trained = load_dcp_tensors(step, list(shapes), shapes)
    assert ours.state_dict().keys() == trained.keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert not torch.equal(ours.norm.weight, hf.model.language_model.norm.weight)  # it trained

    # transformers loads it strictly (no missing or unexpected weights), as the multimodal class and
    # through AutoModelForCausalLM, and generates with the exported tokenizer.
    for cls in (type(hf), transformers.AutoModelForCausalLM):
        model, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (cls, info)
        model.eval()
        ids = text_batch(2, 40)
        with torch.no_grad():
            assert rel_err(logits(ours, ids), model(input_ids=ids).logits) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok(["the red square is"], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 5)
    assert torch.equal(gen[0, :enc["input_ids"].shape[1]], enc["input_ids"][0])  # prompt, then 5 new
