"""Pack multimodal documents into fixed-length rows and collate rows into a training batch.

Rules (the text packer's, data/packing.py, plus what visual content needs):
- a document that fits the row's room (tokens, and visual tokens under the cap) goes in whole;
- one with images or videos that would fit a fresh row closes the row (padding) and opens the
  next one, so that a caption is not separated from its image;
- otherwise (text, or a document longer than a row) it is cut at the last point that fits and
  does not fall inside an image or video; the remainder is carried into the next row as a new
  segment with its own positions;
- a single image or video that cannot fit even an empty row (over seq_len, or over the cap on
  visual tokens per row) cannot be trained on: that document piece is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from data.documents import Document
from data.packing import IGNORE_INDEX
from data.pixels import batch_patches
from model.mrope import mrope_position_ids
from model.vision_processing import VisualInput
from model.vision_tokens import VisionTokenIds


@dataclass
class MMRow:
    tokens: list[int]  # [seq_len]
    seg_lens: list[int]  # one per document piece, plus the padding tail
    num_pad: int
    images: list[VisualInput] = field(default_factory=list)
    videos: list[VisualInput] = field(default_factory=list)
    source_tokens: dict[str, int] = field(default_factory=dict)  # non-pad tokens per source
    # M-RoPE positions [3, n] of each document piece (the padding tail's are implied); None when
    # a piece came without them (collate then computes the batch's with model/mrope.py).
    positions: Optional[list[np.ndarray]] = field(default_factory=list)


def best_cut(doc: Document, room: int, visual_room: int) -> int:
    """Largest c <= room such that doc.tokens[:c] cuts no item and holds <= visual_room visual tokens."""
    c = min(room, len(doc.tokens))
    vis = 0
    for it in doc.items:
        if it.start >= c:
            break
        if it.end > c or vis + it.num_tokens > visual_room:
            return it.start
        vis += it.num_tokens
    return c


class MultimodalPacker:
    """Greedy packer with one carried document piece (see the module rules).

    ``next_row(next_doc)`` pulls Documents from ``next_doc()`` (None = the stream ended) and returns
    an MMRow, or None when nothing is left. ``on_skip(kind, message)`` hears of skipped pieces.
    """

    def __init__(self, seq_len: int, max_visual_tokens: int, pad_id: int,
                 on_skip: Callable[[str, str], None] | None = None):
        self.seq_len, self.cap, self.pad_id = seq_len, max_visual_tokens, pad_id
        self.on_skip = on_skip or (lambda kind, msg: None)
        self.carry: Optional[Document] = None

    def next_row(self, next_doc: Callable[[], Optional[Document]]) -> Optional[MMRow]:
        row = MMRow([], [], 0)
        room, vroom = self.seq_len, self.cap
        while room > 0:
            if self.carry is not None:
                doc, self.carry = self.carry, None
            else:
                doc = next_doc()
                if doc is None:
                    break
            n, nv = len(doc.tokens), doc.num_visual
            if n <= room and nv <= vroom:
                take = doc
            elif doc.items and row.tokens and n <= self.seq_len and nv <= self.cap:
                self.carry = doc  # whole into the next row
                break
            else:
                cut = best_cut(doc, room, vroom)
                if cut == 0:
                    if not row.tokens:
                        it = doc.items[0]
                        self.on_skip("visual_over_cap", f"a {it.visual.kind} of {it.num_tokens} visual "
                                     f"tokens ({it.end - it.start} with its markers) cannot fit a row "
                                     f"of {self.seq_len} tokens with at most {self.cap} visual tokens")
                        rest = doc.tail(it.end)
                        if rest.tokens:
                            self.carry = rest
                        continue
                    self.carry = doc
                    break
                take, self.carry = doc.head(cut), doc.tail(cut)
            row.tokens += take.tokens
            row.seg_lens.append(len(take.tokens))
            if take.positions is None or row.positions is None:
                row.positions = None
            else:
                row.positions.append(take.positions)
            for it in take.items:
                (row.images if it.visual.kind == "image" else row.videos).append(it.visual)
            row.source_tokens[take.source] = row.source_tokens.get(take.source, 0) + len(take.tokens)
            room -= len(take.tokens)
            vroom -= take.num_visual
        if not row.tokens:
            return None
        if room:
            row.tokens += [self.pad_id] * room
            row.seg_lens.append(room)
            row.num_pad = room
        return row


def collate_rows(rows: list[MMRow], ids: VisionTokenIds, merge_size: int = 2, patch_size: int = 16,
                 temporal_patch_size: int = 2) -> dict:
    """Rows -> batch of CPU tensors (B = len(rows), T = seq_len):

    ``input_ids`` [B, T]; ``labels`` [B, T] (shifted; -100 at segment ends, padding, visual pads
    and targets that are visual pads); ``position_ids`` [3, B, T] (M-RoPE t, h, w, restarting per
    segment); ``cu_seqlens`` [N+1]; ``num_tokens`` (labels != -100); ``pixel_values`` [Pi, C*Tp*P*P]
    uint8 (raw patches: the vision model normalises them on its device) and ``image_grid_thw``
    [Ni, 3], ``pixel_values_videos`` / ``video_grid_thw`` (images and videos in order of
    appearance over the flattened batch; absent when there are none);
    ``source_tokens`` {source: non-pad tokens}.

    The text part is data/packing.py's `collate` (same labels and cu_seqlens), in numpy: this
    runs once per batch on the loader's critical path.
    """
    B, T = len(rows), len(rows[0].tokens)
    input_ids = np.array([r.tokens for r in rows], dtype=np.int64)  # [B, T]
    seg_lens = np.array([n for r in rows for n in r.seg_lens], dtype=np.int64)  # [N]
    cu_seqlens = np.zeros(len(seg_lens) + 1, dtype=np.int64)
    np.cumsum(seg_lens, out=cu_seqlens[1:])
    flat = input_ids.reshape(-1)
    labels = np.roll(flat, -1)  # the next token, wrong at segment ends
    labels[cu_seqlens[1:] - 1] = IGNORE_INDEX
    for b, r in enumerate(rows):
        if r.num_pad:
            labels[(b + 1) * T - r.num_pad:(b + 1) * T] = IGNORE_INDEX
    pads = (ids.image_pad, ids.video_pad)
    labels[np.isin(flat, pads) | np.isin(labels, pads)] = IGNORE_INDEX
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels.reshape(B, T)),
             "cu_seqlens": torch.from_numpy(cu_seqlens),
             "num_tokens": int((labels != IGNORE_INDEX).sum())}
    for key, grid_key, kind in (("pixel_values", "image_grid_thw", "images"),
                                ("pixel_values_videos", "video_grid_thw", "videos")):
        items = [v for r in rows for v in getattr(r, kind)]
        if items:
            batch[key] = batch_patches(items, patch_size, temporal_patch_size)
            batch[grid_key] = torch.tensor([v.grid_thw for v in items], dtype=torch.long)
    if all(r.positions is not None for r in rows):
        batch["position_ids"] = torch.from_numpy(np.stack(
            [np.concatenate(r.positions + [np.broadcast_to(np.arange(r.num_pad), (3, r.num_pad))],
                            axis=1) for r in rows], axis=1))
    else:
        batch["position_ids"] = mrope_position_ids(
            batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"),
            batch["cu_seqlens"], image_token_id=ids.image_pad, video_token_id=ids.video_pad,
            spatial_merge_size=merge_size)
    sources: dict[str, int] = {}
    for r in rows:
        for name, n in r.source_tokens.items():
            sources[name] = sources.get(name, 0) + n
    batch["source_tokens"] = sources
    return batch
