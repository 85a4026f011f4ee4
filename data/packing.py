"""Pack documents (text, images, videos) into fixed-length rows, and collate rows into a batch.

A row is ``seq_len`` tokens cut into *segments*: each segment is (part of) one document, attends only
to itself and has its own positions. Rules:
- a document that fits the row's room (tokens, and visual tokens under the cap) goes in whole;
- one with images or videos that would fit a fresh row closes the row (padding) and opens the
  next one, so that a caption is not separated from its image;
- otherwise (text, or a document longer than a row) it is cut at the last point that fits and
  does not fall inside an image or video; the remainder is carried into the next row as a new
  segment with its own positions;
- a single image or video that cannot fit even an empty row (over seq_len, or over the cap on
  visual tokens per row) cannot be trained on: it and the rest of its document (its caption) are
  skipped and counted (``visual_over_cap``). DocumentBuilder sizes images and videos within the
  cap, so this takes a video whose timestamps and tokens together exceed a row.

Collation is two steps, so that loader workers do the per-row work and the training process only
concatenates: `row_arrays` (one row -> numpy arrays: tokens, labels, positions, patches) and
`stack` (rows' arrays -> the batch of tensors). `collate` is both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from data.documents import Document
from data.pixels import batch_patches
from model.vision_processing import VisualInput

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    tokens: list[int]  # [seq_len]
    seg_lens: list[int]  # one per document piece, plus the padding tail
    num_pad: int
    images: list[VisualInput] = field(default_factory=list)
    videos: list[VisualInput] = field(default_factory=list)
    source_tokens: dict[str, int] = field(default_factory=dict)  # non-pad tokens per source
    # [3, n] M-RoPE positions of each document piece; empty: plain text (0, 1, ... per segment)
    positions: list[np.ndarray] = field(default_factory=list)


def padding_row(seq_len: int, pad_id: int) -> PackedRow:
    """A row with no loss on it: what an ended stream contributes."""
    return PackedRow([pad_id] * seq_len, [seq_len], seq_len)


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


class Packer:
    """Greedy packer with one carried document piece (see the module rules).

    ``next_row(next_doc)`` pulls Documents (end-of-document token included) from ``next_doc()``
    (None = the stream ended) and returns a PackedRow, or None when nothing is left.
    ``on_skip(kind, message)`` hears of skipped pieces.
    """

    def __init__(self, seq_len: int, max_visual_tokens: int, pad_id: int,
                 on_skip: Callable[[str, str], None] | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.seq_len, self.cap, self.pad_id = seq_len, max_visual_tokens, pad_id
        self.on_skip = on_skip or (lambda kind, msg: None)
        self.carry: Optional[Document] = None

    def next_row(self, next_doc: Callable[[], Optional[Document]]) -> Optional[PackedRow]:
        row = PackedRow([], [], 0)
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
                        # The rest of the document goes with it: its caption, trained as plain
                        # text, would teach the model to describe what it was not shown.
                        it = doc.items[0]
                        self.on_skip("visual_over_cap", f"a {it.visual.kind} of {it.num_tokens} visual "
                                     f"tokens ({it.end - it.start} with its markers) cannot fit a row "
                                     f"of {self.seq_len} tokens with at most {self.cap} visual "
                                     f"tokens: the rest of its document is dropped")
                        continue
                    self.carry = doc
                    break
                take, self.carry = doc.head(cut), doc.tail(cut)
            row.tokens += take.tokens
            row.seg_lens.append(len(take.tokens))
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


def row_arrays(row: PackedRow, visual_pads: tuple[int, ...] = (), patch_size: int = 16,
               temporal_patch_size: int = 2) -> dict[str, Any]:
    """One row -> numpy arrays (T = seq_len): ``input_ids`` [T], ``labels`` [T] (the next token of
    the same segment; -100 at segment ends, padding, visual pads and targets that are visual pads),
    ``seg_lens`` [n], ``positions`` [3, T], per kind ``images`` / ``videos``: patches [P, C*Tp*P*P]
    uint8 and grids [k, 3]; ``source_tokens`` {source: non-pad tokens}. Plain arrays: cheap to
    send from a loader worker."""
    tokens = np.asarray(row.tokens, dtype=np.int64)
    T = len(tokens)
    labels = np.empty_like(tokens)
    labels[:-1] = tokens[1:]
    labels[np.cumsum(row.seg_lens) - 1] = IGNORE_INDEX
    if row.num_pad:
        labels[T - row.num_pad:] = IGNORE_INDEX
    for pad in visual_pads:  # `==` per id: np.isin costs ~50x more on a row
        labels[(tokens == pad) | (labels == pad)] = IGNORE_INDEX
    pad_pos = np.broadcast_to(np.arange(row.num_pad, dtype=np.int64), (3, row.num_pad))
    if row.positions:
        positions = np.concatenate([*row.positions, pad_pos], axis=1)
    else:  # a row made by hand (tests): text positions, from 0 in each segment
        seg = np.asarray(row.seg_lens)
        flat = np.arange(T) - np.repeat(np.cumsum(seg) - seg, seg)
        positions = np.broadcast_to(flat, (3, T))
    out: dict[str, Any] = {
        "input_ids": tokens, "labels": labels, "seg_lens": np.asarray(row.seg_lens, dtype=np.int64),
        "positions": positions,
        "source_tokens": dict(row.source_tokens)}
    for kind in ("images", "videos"):
        items = getattr(row, kind)
        if items:
            out[kind] = (batch_patches(items, patch_size, temporal_patch_size).numpy(),
                         np.array([v.grid_thw for v in items], dtype=np.int64))
    return out


def stack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`row_arrays` of B rows -> batch of CPU tensors: ``input_ids`` [B, T], ``labels`` [B, T],
    ``position_ids`` [3, B, T] (M-RoPE t, h, w, restarting per segment; [B, T] when no row has an
    image or video: the three rows are equal then, and the model reads both alike),
    ``cu_seqlens`` [N+1] int64 (segment boundaries over the flattened B*T tokens, fla varlen
    convention), ``num_tokens`` (labels != -100); ``pixel_values`` [Pi, C*Tp*P*P] uint8 (raw
    patches: the vision model normalises them on its device) and ``image_grid_thw`` [Ni, 3],
    ``pixel_values_videos`` / ``video_grid_thw`` (in order of appearance over the flattened batch;
    absent when there are none); ``source_tokens`` {source: non-pad tokens}."""
    seg_lens = np.concatenate([r["seg_lens"] for r in rows])
    cu_seqlens = np.zeros(len(seg_lens) + 1, dtype=np.int64)
    np.cumsum(seg_lens, out=cu_seqlens[1:])
    labels = np.stack([r["labels"] for r in rows])
    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows])),
        "labels": torch.from_numpy(labels), "cu_seqlens": torch.from_numpy(cu_seqlens),
        "num_tokens": int((labels != IGNORE_INDEX).sum())}
    visual = False
    for kind, key, grid_key in (("images", "pixel_values", "image_grid_thw"),
                                ("videos", "pixel_values_videos", "video_grid_thw")):
        parts = [r[kind] for r in rows if kind in r]
        if parts:
            visual = True
            batch[key] = torch.from_numpy(np.concatenate([p for p, _ in parts]))
            batch[grid_key] = torch.from_numpy(np.concatenate([g for _, g in parts]))
    positions = np.stack([r["positions"] for r in rows], axis=1)  # [3, B, T]
    batch["position_ids"] = torch.from_numpy(positions if visual else positions[0].copy())
    sources: dict[str, int] = {}
    for r in rows:
        for name, n in r["source_tokens"].items():
            sources[name] = sources.get(name, 0) + n
    batch["source_tokens"] = sources
    return batch


def collate(rows: list[PackedRow], visual_pads: tuple[int, ...] = (), patch_size: int = 16,
            temporal_patch_size: int = 2) -> dict[str, Any]:
    """Rows -> batch (see `stack`); ``visual_pads``: the image and video pad ids (no loss there)."""
    return stack([row_arrays(r, visual_pads, patch_size, temporal_patch_size) for r in rows])


def random_batch(seed: int, rows: int, seq_len: int, vocab: int,
                 doc_len: tuple[int, int] = (4, 20)) -> dict:
    """A batch as the loader makes it (`Packer`, `collate`) from random documents of
    doc_len[0] .. doc_len[1] - 1 tokens (ids 8 .. vocab - 1, end-of-document 1): what the parallel
    tests and benchmarks train on."""
    g = torch.Generator().manual_seed(seed)
    packer = Packer(seq_len, seq_len, pad_id=0)

    def document() -> Document:
        n = int(torch.randint(*doc_len, (1,), generator=g))
        return Document(torch.randint(8, vocab, (n,), generator=g).tolist() + [1])

    return collate([packer.next_row(document) for _ in range(rows)])
