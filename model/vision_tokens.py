"""Where visual tokens sit in the language sequence, and the checks that they match the pixels.

Layout (released Qwen3.5 / Qwen3-VL):
- image: <|vision_start|> + <|image_pad|> x (t*h*w / merge^2) + <|vision_end|>
- video, per temporal patch i: the text "<{ts_i:.1f} seconds>" + <|vision_start|>
  + <|video_pad|> x (h*w / merge^2) + <|vision_end|>

The decoder replaces each pad's embedding with one merged visual token, images and videos each in
their order of appearance over the flattened batch (row 0 first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union

import torch

from model.vision_config import VisionConfig
from model.vision_processing import VisualInput


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class VisionTokenIds:
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "VisionTokenIds":
        return cls(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                   cfg.vision_end_token_id)

    @classmethod
    def from_tokenizer(cls, tok) -> "VisionTokenIds":
        """From a tokenizer with `token_id(name)` (data/tokenizer.py) or HF `convert_tokens_to_ids`."""
        get = getattr(tok, "token_id", None) or tok.convert_tokens_to_ids
        return cls(get("<|image_pad|>"), get("<|video_pad|>"), get("<|vision_start|>"),
                   get("<|vision_end|>"))


def num_visual_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """Merged tokens of one image or video: t*h*w / merge^2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


def image_token_ids(grid_thw: Sequence[int], ids: VisionTokenIds, merge_size: int = 2) -> list[int]:
    return [ids.vision_start] + [ids.image_pad] * num_visual_tokens(grid_thw, merge_size) + [ids.vision_end]


def video_token_ids(grid_thw: Sequence[int], timestamps: Sequence[float], tokenizer: TokenizerLike,
                    ids: VisionTokenIds, merge_size: int = 2) -> list[int]:
    t, h, w = (int(v) for v in grid_thw)
    if len(timestamps) != t:
        raise ValueError(f"video with grid {tuple(grid_thw)} has {t} temporal patches but "
                         f"{len(timestamps)} timestamps")
    per_patch = num_visual_tokens((1, h, w), merge_size)
    out: list[int] = []
    for ts in timestamps:
        out += tokenizer.encode(f"<{ts:.1f} seconds>")
        out += [ids.vision_start] + [ids.video_pad] * per_patch + [ids.vision_end]
    return out


@dataclass
class ExpandedDocument:
    """A document as token ids plus its visual inputs in order of appearance."""

    input_ids: list[int]
    images: list[VisualInput] = field(default_factory=list)
    videos: list[VisualInput] = field(default_factory=list)


def expand_document(segments: Sequence[Union[str, VisualInput]], tokenizer: TokenizerLike,
                    ids: Optional[VisionTokenIds] = None, merge_size: int = 2) -> ExpandedDocument:
    """Text segments and processed images/videos (model/vision_processing.py) -> token ids with the
    placeholders expanded. `ids` defaults to the tokenizer's own special tokens."""
    ids = ids or VisionTokenIds.from_tokenizer(tokenizer)
    doc = ExpandedDocument([])
    for seg in segments:
        if isinstance(seg, str):
            doc.input_ids += tokenizer.encode(seg)
        elif seg.kind == "image":
            doc.input_ids += image_token_ids(seg.grid_thw, ids, merge_size)
            doc.images.append(seg)
        elif seg.kind == "video":
            doc.input_ids += video_token_ids(seg.grid_thw, seg.timestamps, tokenizer, ids, merge_size)
            doc.videos.append(seg)
        else:
            raise ValueError(f"segment kind {seg.kind!r}: must be 'image' or 'video'")
    return doc


def check_placeholder_counts(input_ids: torch.Tensor, grid_thw: Optional[torch.Tensor],
                             token_id: int, merge_size: int, kind: str) -> None:
    """Raise ValueError unless the pads of `token_id` in input_ids [B, T] are exactly the merged
    tokens of grid_thw [M, 3], taken in order over the rows, with no item split across rows.

    The message names the first batch row that disagrees, its pad count and the visual tokens of
    the items that fall to it, e.g. "image tokens do not match the images: batch row 1 has 60
    <|image_pad|> tokens but its images (grids [(1, 16, 16)]) give 64 visual tokens".
    """
    pads = (input_ids == token_id).sum(dim=1).tolist()
    counts = [] if grid_thw is None else [num_visual_tokens(g, merge_size) for g in grid_thw.tolist()]
    grids = [] if grid_thw is None else [tuple(g) for g in grid_thw.tolist()]
    pad_name = "<|image_pad|>" if kind == "image" else "<|video_pad|>"
    head = f"{kind} tokens do not match the {kind}s: "
    i = 0
    for row, need in enumerate(pads):
        got, first = 0, i
        while got < need and i < len(counts):
            got += counts[i]
            i += 1
        if got != need:
            raise ValueError(f"{head}batch row {row} has {need} {pad_name} tokens but its {kind}s "
                             f"(grids {grids[first:i]}) give {got} visual tokens")
    if i < len(counts):
        raise ValueError(f"{head}the batch has {sum(pads)} {pad_name} tokens but {len(counts)} "
                         f"{kind}s with {sum(counts)} visual tokens: {len(counts) - i} {kind}s "
                         f"(grids {grids[i:]}) have no placeholder")
