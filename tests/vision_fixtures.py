"""Helpers for the vision tests: in-memory multimodal documents packed into batches the way the
data pipeline will pack them (per-document cu_seqlens, shifted labels, M-RoPE positions)."""

from __future__ import annotations

import torch

from model.mrope import mrope_position_ids
from model.vision_processing import VisualInput, process_image
from model.vision_tokens import ExpandedDocument, expand_document

# The smoke tokenizer's reserved ids (data/tokenizer.py), as configs/model/tiny_vl.yaml uses.
EOS, PAD, VS, VE, IMG, VID = 0, 1, 2, 3, 4, 5

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0)}


class ToyTokenizer:
    """Bytes shifted past the reserved ids; enough for layout tests without the BPE file."""

    def encode(self, text: str) -> list[int]:
        return [16 + b for b in text.encode()]

    def token_id(self, name: str) -> int:
        return {"<|vision_start|>": VS, "<|vision_end|>": VE, "<|image_pad|>": IMG,
                "<|video_pad|>": VID}[name]


def random_image(h: int, w: int, seed: int = 0) -> VisualInput:
    """An image of exactly (h, w) pixels (multiples of 32), so no resize happens."""
    g = torch.Generator().manual_seed(seed)
    return process_image(torch.rand(3, h, w, generator=g), min_pixels=32 * 32)


def random_video(frames: int, h: int, w: int, seed: int = 0) -> VisualInput:
    from model.vision_processing import process_video

    g = torch.Generator().manual_seed(seed)
    return process_video(torch.rand(frames, 3, h, w, generator=g), video_fps=2.0, fps=None,
                         min_pixels=32 * 32, max_pixels=frames * h * w)


def square_image(colour: str, size: int = 64, seed: int = 0) -> VisualInput:
    """A coloured square on a grey background, at a random place, with a little noise."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, size, size), 0.5) + 0.05 * torch.randn(3, size, size, generator=g)
    side = size // 2
    y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
    img[:, y:y + side, x:x + side] = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    return process_image(img.clamp(0, 1), min_pixels=32 * 32)


def pack(docs: list[ExpandedDocument], seq_len: int, merge: int = 2) -> dict:
    """Greedy packing of whole documents (each ends with EOS) into rows of seq_len tokens, padded.

    -> batch dict: input_ids, labels (shifted; -100 at each document's last token and padding),
    cu_seqlens (one segment per document and per padding tail), position_ids [3, B, T],
    num_tokens, and pixel_values/image_grid_thw, pixel_values_videos/video_grid_thw in order.
    """
    rows, cur = [], []
    for d in docs:
        ids = d.input_ids + [EOS]
        if len(ids) > seq_len:
            raise ValueError("document longer than a row")
        if sum(len(x.input_ids) + 1 for x in cur) + len(ids) > seq_len:
            rows.append(cur)
            cur = []
        cur.append(d)
    rows.append(cur)
    input_ids, labels, lengths, images, videos = [], [], [], [], []
    for row in rows:
        r_ids, r_lab = [], []
        for d in row:
            ids = d.input_ids + [EOS]
            r_ids += ids
            r_lab += ids[1:] + [-100]
            lengths.append(len(ids))
            images += d.images
            videos += d.videos
        if len(r_ids) < seq_len:
            lengths.append(seq_len - len(r_ids))
            r_lab += [-100] * (seq_len - len(r_ids))
            r_ids += [PAD] * (seq_len - len(r_ids))
        input_ids.append(r_ids)
        labels.append(r_lab)
    batch = {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "cu_seqlens": torch.tensor([0] + lengths).cumsum(0),
    }
    for key, grid_key, items in (("pixel_values", "image_grid_thw", images),
                                 ("pixel_values_videos", "video_grid_thw", videos)):
        if items:
            batch[key] = torch.cat([v.pixel_values for v in items])
            batch[grid_key] = torch.tensor([v.grid_thw for v in items])
    batch["position_ids"] = mrope_position_ids(
        batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"),
        batch["cu_seqlens"], image_token_id=IMG, video_token_id=VID, spatial_merge_size=merge)
    batch["num_tokens"] = int((batch["labels"] != -100).sum())
    return batch


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "position_ids", "cu_seqlens", "labels", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw")
    return {k: batch[k] for k in keys if k in batch}


def caption_batch(tok, step: int, rows: int = 4, seq_len: int = 64, text_docs: bool = True) -> dict:
    """Mixed batch: image-caption documents ("<image> red") and short text-only documents."""
    g = torch.Generator().manual_seed(1000 + step)
    names = list(COLOURS)
    docs = []
    for i in range(2 * rows):
        colour = names[int(torch.randint(len(names), (1,), generator=g))]
        img = square_image(colour, seed=step * 100 + i)
        docs.append(expand_document([img, f" {colour}"], tok))
        if text_docs and i % 2:
            docs.append(expand_document([" the cat sat on the mat"], tok))
    return pack(docs, seq_len)
