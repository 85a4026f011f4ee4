"""The trainer on the layout-free loader (data/loader.py): `python -m train.main` with 2 data-parallel
gloo ranks logs the losses of one process accumulating the same global batch, and a dp=2 run
resumed in one process continues that trajectory."""

import pytest

from tests.test_train_distributed import train

ARGS = ["model.mtp_num_layers=0", "model.router_aux_loss_coef=0", "data.global_batch_size=4",
        "data.virtual_streams=8", "train.max_steps=4", "train.lr_decay_steps=4"]
KEYS = ("loss", "ce", "grad_norm", "lr", "loss_tokens")


def test_data_parallel_run_and_its_resize_follow_one_trajectory(tmp_path):
    one = train(tmp_path / "one", 1, *ARGS, "train.grad_accum=2", "checkpoint.interval=0")
    dp2 = train(tmp_path / "dp2", 2, *ARGS, "parallel.dp_shard=2", "data.num_workers=2",
                "checkpoint.interval=0")
    for key in KEYS:
        assert [r[key] for r in dp2] == pytest.approx([r[key] for r in one], rel=2e-5), key
    # 2 steps on 2 ranks, a checkpoint, 2 more in one process (another worker count too).
    resized = tmp_path / "resized"
    train(resized, 2, *ARGS, "parallel.dp_shard=2", "train.max_steps=2", "checkpoint.interval=2")
    after = train(resized, 1, *ARGS, "train.grad_accum=2", "data.num_workers=1",
                  "checkpoint.interval=0")
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    for key in KEYS:
        assert [r[key] for r in after] == pytest.approx([r[key] for r in one], rel=2e-5), key
