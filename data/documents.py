"""Raw webdataset samples -> tokenised documents with their processed images and videos.

decode (data/decode.py) -> resize to the patch grid within the pixel budget, patchify
(data/pixels.py: model/vision_processing.py's rules, pixels kept uint8 until the batch is
collated) -> tokenize text and lay out the vision placeholders (model/vision_tokens.py) -> M-RoPE
positions (data/positions.py). A document remembers where each visual item's tokens are, so that
the packer never cuts through one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np

from data.config import DataConfig, fill_vision_defaults
from data.decode import decode_image, decode_video
from data.format import BadSample, parse_sample
from data.pixels import image_patches, video_patches_at, video_plan
from data.positions import document_positions, piece_positions
from model.vision_processing import VisualInput
from model.vision_tokens import VisionTokenIds, image_token_ids, num_visual_tokens, video_token_ids


@dataclass
class VisualItem:
    start: int  # first token of the item's layout (video: its first timestamp text) in the document
    end: int  # one past its last token (<|vision_end|>)
    visual: VisualInput  # uint8 patches (data/pixels.py; a still image: one frame)
    num_tokens: int  # merged visual tokens (pads)


@dataclass
class Document:
    """Token ids (end-of-document included) and visual items in order; ``positions`` [3, tokens]
    int64 their M-RoPE positions (None: 0, 1, 2, ..., right for plain text; DocumentBuilder gives
    documents with media theirs); ``ref`` locates the raw
    sample in its stream (for the packer's resumable carry), ``offset`` is where this piece starts
    in the whole document (> 0 for the remainder of a split document)."""

    tokens: list[int]
    items: list[VisualItem] = field(default_factory=list)
    source: str = "default"
    ref: Optional[dict[str, Any]] = None
    offset: int = 0
    positions: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.positions is None:  # a running index: right for plain text
            self.positions = np.broadcast_to(np.arange(len(self.tokens), dtype=np.int64),
                                             (3, len(self.tokens)))

    @property
    def num_visual(self) -> int:
        return sum(it.num_tokens for it in self.items)

    def tail(self, cut: int) -> "Document":
        """The piece from token ``cut`` on; ``cut`` must not fall inside an item."""
        items = [replace(it, start=it.start - cut, end=it.end - cut) for it in self.items
                 if it.start >= cut]
        pos = piece_positions(self.positions, cut)
        return Document(self.tokens[cut:], items, self.source, self.ref, self.offset + cut, pos)

    def head(self, cut: int) -> "Document":
        pos = self.positions[:, :cut]
        return Document(self.tokens[:cut], [it for it in self.items if it.end <= cut], self.source,
                        self.ref, self.offset, pos)


class DocumentBuilder:
    """``build(raw, source)`` -> Document, or raises BadSample. ``count(kind)`` is called for
    samples that are kept but noteworthy (``oversized_image``: resized down to the budget)."""

    def __init__(self, cfg: DataConfig, tokenizer, count: Callable[[str], None] | None = None):
        fill_vision_defaults(cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        try:
            self.ids: Optional[VisionTokenIds] = VisionTokenIds.from_tokenizer(tokenizer)
        except KeyError:  # a text-only tokenizer: documents with media are skipped
            self.ids = None
        self.eos_id = tokenizer.eos_id
        self.count = count or (lambda kind: None)
        # The pixel budgets, capped at what a packed row takes (data.max_visual_tokens merged
        # tokens): a photo larger than a row's share is trained on smaller, not dropped.
        cap = cfg.visual_token_cap
        token_pixels = (cfg.patch_size * cfg.merge_size) ** 2  # pixels per merged token
        self.image_max_pixels = min(cfg.image_max_pixels, cap * token_pixels)
        self.video_max_pixels = min(cfg.video_max_pixels, cap * token_pixels * cfg.temporal_patch_size)

    def plan_video(self, total: int, clip_fps: float, height: int, width: int):
        """(kept frame indices, (h, w)) of a clip under this config's budget, capped at a row."""
        c = self.cfg
        return video_plan(total, clip_fps, height, width, c.video_fps, c.patch_size,
                          c.temporal_patch_size, c.merge_size,
                          min(c.video_min_pixels, self.video_max_pixels), self.video_max_pixels,
                          c.video_min_frames, c.video_max_frames)

    def build(self, raw: dict[str, Any], source: str = "default") -> Document:
        c, merge = self.cfg, self.cfg.merge_size
        tokens: list[int] = []
        items: list[VisualItem] = []
        blocks: list[tuple[int, tuple[int, int, int]]] = []  # (first pad, merged grid) for positions
        for seg in parse_sample(raw):
            if "text" in seg:
                tokens += self.tokenizer.encode(seg["text"])
                continue
            if self.ids is None:
                raise BadSample("no_vision_tokens", f"{seg['key']!r}: the tokenizer has no "
                                f"<|image_pad|> / <|video_pad|> tokens")
            if "image" in seg:
                pixels, oversized = decode_image(seg["image"], self.image_max_pixels)
                if oversized:
                    self.count("oversized_image")
                try:
                    vis = image_patches(pixels, c.patch_size, merge,
                                        min(c.image_min_pixels, self.image_max_pixels),
                                        self.image_max_pixels)
                except ValueError as e:  # e.g. an aspect ratio over 200
                    raise BadSample("bad_image", f"image {seg['key']!r}: {e}") from None
                layout = image_token_ids(vis.grid_thw, self.ids, merge)
                t, h, w = vis.grid_thw
                blocks.append((len(tokens) + 1, (t, h // merge, w // merge)))
            else:
                try:
                    frames, fps, kept, size = decode_video(seg["video"], seg["key"], seg.get("fps"),
                                                           self.plan_video)
                    vis = video_patches_at(frames, kept, size, fps, c.patch_size,
                                           c.temporal_patch_size, merge)
                except ValueError as e:
                    raise BadSample("bad_video", f"video {seg['key']!r}: {e}") from None
                layout = video_token_ids(vis.grid_thw, vis.timestamps, self.tokenizer, self.ids, merge)
                t, h, w = vis.grid_thw
                k = 0
                for _ in range(t):  # one block per temporal patch, after its timestamp text
                    k = layout.index(self.ids.video_pad, k)
                    blocks.append((len(tokens) + k, (1, h // merge, w // merge)))
                    k += h * w // (merge * merge)
            items.append(VisualItem(len(tokens), len(tokens) + len(layout), vis,
                                    num_visual_tokens(vis.grid_thw, merge)))
            tokens += layout
        if not tokens:
            raise BadSample("empty_document", "the document has no tokens")
        tokens.append(self.eos_id)
        return Document(tokens, items, source, positions=document_positions(len(tokens), blocks))
