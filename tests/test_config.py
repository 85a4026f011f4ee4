"""A bad config stops before any work with one message naming the field, the value and the rule."""

import subprocess
import sys

import pytest

from model.config import ConfigError
from train.main import load_config


def test_default_and_smoke_compose():
    cfg = load_config(["experiment=smoke_cpu"])
    assert cfg.model.name == "smoke_vl" and cfg.data.name == "webdataset"
    assert cfg.train.max_steps == 200 and cfg.train.device == "cpu"
    assert load_config(["experiment=smoke_cpu_text"]).model.name == "smoke"
    assert cfg.run_dir == "runs/smoke_cpu"  # the experiment overrides the root config's values
    assert load_config(["experiment=smoke_cpu", "run_dir=/x"]).run_dir == "/x"
    for name in ("tiny", "qwen35_397b_a17b", "qwen35_35b_a3b", "qwen3_next_80b_a3b"):
        assert load_config([f"model={name}"]).model.name == name


@pytest.mark.parametrize("override,expected", [
    ("train.max_steps=abc", ["train.max_steps", "abc", "Integer"]),
    ("train.no_such_key=1", ["train.no_such_key", "not in"]),
    ("model.num_attention_heads=3", ["model.num_attention_heads=3", "divisible",
                                     "num_key_value_heads=2"]),
    ("model.num_experts_per_tok=9", ["model.num_experts_per_tok=9", "num_experts=8"]),
    ("model.layer_types=[full_attention,linear_attention]", ["model.layer_types", "one entry per layer",
                                                             "num_layers=4"]),
    ("train.schedule=linear", ["train.schedule='linear'", "cosine"]),
    ("data.seq_len=1", ["data.seq_len=1", ">= 2"]),
    ("model.linear_num_value_heads=3", ["model.linear_num_value_heads=3", "linear_num_key_heads"]),
    # '+' adds a key past the schema; it used to be dropped without a word.
    ("+train.anything=1", ["train.anything", "not a config field"]),
    ("+anything=1", ["anything", "not a config field"]),
    ("+parallel.vision.spread=1", ["parallel.vision.spread", "not a config field"]),
    ("+data.sources={web: {shards: /a.tar, wieght: 2}}", ["wieght"]),
    # Shards without data=webdataset: the run used to train on synthetic text instead.
    ("data.shards=/d/shard-000000.tar", ["data.shards='/d/shard-000000.tar'", "data=webdataset"]),
    ("+data.sources={web: {shards: /a.tar}}", ["data.sources=['web']", "data=webdataset"]),
    ("train.max_consecutive_bad_steps=0", ["train.max_consecutive_bad_steps=0", ">= 1"]),
])
def test_bad_values_name_field_value_and_rule(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(["model=tiny", override])
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in expected:
        assert fragment in msg


def test_cli_exits_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "train.main", "experiment=smoke_cpu",
                           f"run_dir={run_dir}", "model.num_experts_per_tok=64"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: model.num_experts_per_tok=64: must be in [1, model.num_experts=8]"]
    assert not run_dir.exists()


def test_brace_ranges_survive_the_shell():
    """The shell strips the quotes of data.shards='DIR/shard-{000000..000009}.tar'."""
    cfg = load_config(["experiment=smoke_cpu", "data.shards=/d/shard-{000000..000009}.tar"])
    assert cfg.data.shards == "/d/shard-{000000..000009}.tar"
    quoted = load_config(["experiment=smoke_cpu", "data.shards='/d/s-{0..1}.tar'"])
    assert quoted.data.shards == "/d/s-{0..1}.tar"
