"""End-of-run report: held-out caption loss with images vs noise, and the loss-curve plot."""

import math

import torch
from PIL import Image

from model.language_model import Qwen35LM
from train.main import load_config
from train.report import caption_loss_gap, plot_loss_curves


def test_caption_loss_gap_runs_on_heldout_batches():
    cfg = load_config(["experiment=smoke_cpu", "model=tiny_vl", "data.seq_len=128",
                       "data.batch_size=2"])
    torch.manual_seed(0)
    model = Qwen35LM(cfg.model)
    result = caption_loss_gap(model, cfg.data, 6, torch.device("cpu"), None)
    assert result["heldout_caption_tokens"] > 0
    for key in ("heldout_caption_ce_images", "heldout_caption_ce_noise"):
        assert math.isfinite(result[key]) and result[key] > 0
    # Untrained, the model barely uses the image: the two losses differ, but not by much.
    assert result["heldout_caption_ce_images"] != result["heldout_caption_ce_noise"]
    assert model.training


def test_plot_loss_curves(tmp_path):
    history = [{"step": s, "loss": 5.0 / s, "ce_after_vision": 4.0 / s, "ce_text": None}
               for s in range(1, 11)]
    plot_loss_curves(history, tmp_path / "curves.png")
    img = Image.open(tmp_path / "curves.png")
    assert img.size == (900, 500)
    assert len(set(img.getdata())) > 3  # axes, two curves, labels
