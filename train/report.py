"""End-of-run report: the caption loss on held-out samples with their images and with the images
replaced by noise (the gap shows that the model looks), and a PNG plot of the loss curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from data.heldout import heldout_batches
from train.precision import autocast

log = logging.getLogger("train")
# Optional batch entries of multimodal data, passed to the model when present.
VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@torch.no_grad()
def caption_loss_gap(model, data_cfg, num_docs: int, device, amp_dtype, seed: int = 0) -> dict[str, Any]:
    """Token-weighted caption CE (targets after a visual block) on held-out batches, once with the
    real pixels and once with pixels drawn uniformly from the real pixels' range."""
    gen = torch.Generator().manual_seed(seed)
    totals = {"images": [0.0, 0], "noise": [0.0, 0]}
    was_training = model.training
    model.eval()
    for batch in heldout_batches(data_cfg, num_docs):
        for mode in totals:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "position_ids",
                                                        "cu_seqlens")}
            for k in VISUAL_KEYS:
                if batch.get(k) is None:
                    continue
                v = batch[k]
                if mode == "noise" and v.is_floating_point():
                    lo, hi = float(v.min()), float(v.max())
                    v = torch.rand(v.shape, generator=gen, dtype=v.dtype) * (hi - lo) + lo
                inputs[k] = v.to(device)
            with autocast(device, amp_dtype):
                out = model(**inputs)
            if out.num_tokens_after_vision:
                totals[mode][0] += float(out.ce_after_vision) * out.num_tokens_after_vision
                totals[mode][1] += out.num_tokens_after_vision
    model.train(was_training)
    result = {f"heldout_caption_ce_{mode}": s / max(n, 1) for mode, (s, n) in totals.items()}
    result["heldout_caption_tokens"] = totals["images"][1]
    result["heldout_docs"] = num_docs
    return result


def write_caption_report(result: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "heldout_caption_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("held-out caption loss over %d tokens: %.4f with the images, %.4f with noise instead "
             "(gap %.4f)", result["heldout_caption_tokens"], result["heldout_caption_ce_images"],
             result["heldout_caption_ce_noise"],
             result["heldout_caption_ce_noise"] - result["heldout_caption_ce_images"])


CURVES = (("loss", (31, 119, 180)), ("ce_after_vision", (214, 39, 40)), ("ce_text", (44, 160, 44)))


def plot_loss_curves(history: list[dict[str, Any]], path: Path, size=(900, 500)) -> None:
    """Line plot of loss, ce_after_vision and ce_text against step (those present), drawn with
    pillow so that no plotting library is needed."""
    series = {name: [(r["step"], r[name]) for r in history
                     if isinstance(r.get(name), (int, float))] for name, _ in CURVES}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    w, h = size
    left, right, top, bottom = 70, 20, 40, 50
    steps = [s for pts in series.values() for s, _ in pts]
    values = [v for pts in series.values() for _, v in pts]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(0.0, min(values)), max(values) * 1.05 or 1.0
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)

    def xy(step, value):
        return (left + (step - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (value - y0) / (y1 - y0) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):  # axis ticks
        yv = y0 + (y1 - y0) * i / 5
        _, y = xy(x0, yv)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((5, y - 6), f"{yv:.2f}", fill="black")
        xv = x0 + (x1 - x0) * i / 5
        x, _ = xy(xv, y0)
        draw.line([x, h - bottom, x, h - bottom + 5], fill="black")
        draw.text((x - 10, h - bottom + 8), f"{xv:.0f}", fill="black")
    draw.text((w // 2 - 15, h - 18), "step", fill="black")
    for k, (name, colour) in enumerate(c for c in CURVES if c[0] in series):
        draw.line([xy(s, v) for s, v in series[name]], fill=colour, width=2)
        draw.text((left + 10 + 170 * k, 12), name, fill=colour)
    img.save(path)
