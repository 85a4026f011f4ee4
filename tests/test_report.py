"""End-of-run report: held-out caption loss with images, shuffled images and noise, and the loss-curve plot."""

import math

import pytest
import torch
from PIL import Image

from data.heldout import heldout_batches
from data.tokenizer import load_tokenizer
from model.language_model import Qwen35LM
from train.main import load_config
from train.report import caption_loss_gap, plot_loss_curves, shuffled_visuals


def test_caption_loss_gap_runs_on_heldout_batches():
    cfg = load_config(["experiment=smoke_cpu", "model=tiny_vl", "data.seq_len=128",
                       "data.batch_size=2"])
    torch.manual_seed(0)
    model = Qwen35LM(cfg.model)
    result = caption_loss_gap(model, cfg.data, 6, torch.device("cpu"), None)
    # Caption tokens are a part of the tokens after an image.
    assert 0 < result["heldout_caption_tokens"] < result["heldout_after_vision_tokens"]
    for target in ("caption", "after_vision"):
        for mode in ("images", "shuffled", "noise"):
            assert math.isfinite(result[f"heldout_{target}_ce_{mode}"])
        # Untrained, the model barely uses the image: the losses differ, but not by much.
        assert result[f"heldout_{target}_ce_images"] != result[f"heldout_{target}_ce_noise"]
    assert model.training


def test_heldout_caption_mask_and_shuffled_images():
    cfg = load_config(["experiment=smoke_cpu", "data.seq_len=128", "data.batch_size=2"])
    batches = heldout_batches(cfg.data, 40)
    tok = load_tokenizer(None)
    targets = [b["labels"][b["caption_mask"]].tolist() for b in batches]
    assert all(t > 5 for ts in targets for t in ts)  # text, never a special token
    text = tok.decode([t for ts in targets for t in ts])
    assert " at the " in text and " square moves " in text  # image and video captions
    shuffled = shuffled_visuals(batches)
    for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        real = [b[key] for b in batches if key in b]
        fake = [s[key] for s in shuffled if key in s]
        assert [r.shape for r in real] == [f.shape for f in fake]
        # The same items, each in another item's place.
        real, fake = torch.cat(real).double(), torch.cat(fake).double()
        assert float(real.sum()) == pytest.approx(float(fake.sum()), rel=1e-12)
        assert not torch.equal(real, fake)


def test_plot_loss_curves(tmp_path):
    history = [{"step": s, "loss": 5.0 / s, "ce_after_vision": 4.0 / s, "ce_text": None}
               for s in range(1, 11)]
    plot_loss_curves(history, tmp_path / "curves.png")
    img = Image.open(tmp_path / "curves.png")
    assert img.size == (900, 500)
    assert len(set(img.getdata())) > 3  # axes, two curves, labels
