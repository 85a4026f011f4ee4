"""End-of-run report: the caption loss on held-out samples with their own images, with other
held-out images (shuffled) and with noise instead (the gaps show that the model looks), and a PNG
plot of the loss curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from data.heldout import heldout_batches
from model.language_model import VISUAL_KEYS
from train.precision import autocast

log = logging.getLogger("train")
# Optional batch entries of multimodal data, passed to the model when present.
PIXELS_AND_GRIDS = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))
MODES = ("images", "shuffled", "noise")


def shuffled_visuals(batches: list[dict]) -> list[dict]:
    """Per batch, its pixel tensors with every image (video) replaced by the next held-out image
    (video) of the same grid, over all batches: real pixels, but another caption's. An item whose
    grid no other item has keeps its own."""
    items: dict[tuple, list[tuple[int, str, int]]] = {}  # (key, grid) -> (batch, key, index)
    parts: dict[tuple[int, str], list[torch.Tensor]] = {}
    for i, b in enumerate(batches):
        for key, grid_key in PIXELS_AND_GRIDS:
            if b.get(key) is None:
                continue
            grids = [tuple(g) for g in b[grid_key].tolist()]
            parts[i, key] = list(b[key].split([t * h * w for t, h, w in grids]))
            for j, g in enumerate(grids):
                items.setdefault((key, g), []).append((i, key, j))
    new = {k: list(v) for k, v in parts.items()}
    for group in items.values():
        for (i, key, j), (i2, key2, j2) in zip(group, group[1:] + group[:1]):
            new[i, key][j] = parts[i2, key2][j2]
    return [{key: torch.cat(new[i, key]) for key, _ in PIXELS_AND_GRIDS if (i, key) in new}
            for i in range(len(batches))]


@torch.no_grad()
def caption_loss_gap(model, data_cfg, num_docs: int, device, amp_dtype, seed: int = 0) -> dict[str, Any]:
    """Token-weighted CE on held-out batches (data/heldout.py) over two sets of targets: the
    caption tokens (the text right after each image or video) and all targets after a document's
    first visual block (the model's ``ce_after_vision``, which also holds the paragraphs that
    follow an image in interleaved documents). Each three ways: with the real pixels; with the
    images and videos shuffled across captions (`shuffled_visuals`); with pixels drawn uniformly
    from the real pixels' range. Only the first of the three is what the captions describe."""
    gen = torch.Generator().manual_seed(seed)
    totals = {(target, mode): [0.0, 0] for target in ("caption", "after_vision") for mode in MODES}
    was_training = model.training
    model.eval()
    batches = heldout_batches(data_cfg, num_docs)
    for batch, shuffled in zip(batches, shuffled_visuals(batches)):
        for mode in MODES:
            visual = {k: batch[k] for k in VISUAL_KEYS if batch.get(k) is not None}
            if mode == "shuffled":
                visual.update(shuffled)
            elif mode == "noise":
                for key, _ in PIXELS_AND_GRIDS:
                    if key in visual:
                        v = visual[key]
                        lo, hi = float(v.min()), float(v.max())
                        noise = torch.rand(v.shape, generator=gen) * (hi - lo) + lo
                        if v.dtype == torch.uint8:  # the loader's raw pixels, normalised by the model
                            noise = noise.round()
                        visual[key] = noise.to(v.dtype)
            inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "cu_seqlens")}
            inputs.update({k: v.to(device) for k, v in visual.items()})
            caption_labels = batch["labels"].masked_fill(~batch["caption_mask"], -100)
            with autocast(device, amp_dtype):
                out = model(**inputs, labels=batch["labels"].to(device))
                cap = model(**inputs, labels=caption_labels.to(device))
            for target, ce, n in (("after_vision", out.ce_after_vision, out.num_tokens_after_vision),
                                  ("caption", cap.ce, cap.num_tokens)):
                if n:
                    totals[target, mode][0] += float(ce) * n
                    totals[target, mode][1] += n
    model.train(was_training)
    result: dict[str, Any] = {}
    for target in ("caption", "after_vision"):
        for mode in MODES:
            s, n = totals[target, mode]
            result[f"heldout_{target}_ce_{mode}"] = s / max(n, 1)
        result[f"heldout_{target}_tokens"] = totals[target, "images"][1]
    result["heldout_docs"] = num_docs
    return result


def write_caption_report(result: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "heldout_caption_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    log.info("held-out caption loss over %d caption tokens: %.4f with the images, %.4f with shuffled "
             "images, %.4f with noise (gaps %.4f, %.4f); over all %d tokens after an image: %.4f, "
             "%.4f, %.4f", r["heldout_caption_tokens"], r["heldout_caption_ce_images"],
             r["heldout_caption_ce_shuffled"], r["heldout_caption_ce_noise"],
             r["heldout_caption_ce_shuffled"] - r["heldout_caption_ce_images"],
             r["heldout_caption_ce_noise"] - r["heldout_caption_ce_images"],
             r["heldout_after_vision_tokens"], r["heldout_after_vision_ce_images"],
             r["heldout_after_vision_ce_shuffled"], r["heldout_after_vision_ce_noise"])


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
