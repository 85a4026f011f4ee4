"""Held-out multimodal batches for end-of-run checks: synthetic documents from a seed the training
shards never use, built and packed exactly as the streaming loader builds and packs its own, with
a mask of their caption tokens."""

from __future__ import annotations

import torch

from data.config import DataConfig
from data.documents import DocumentBuilder
from data.format import BadSample, encode_sample
from data.packing import Packer, collate
from data.synthetic import synthetic_sample
from data.synthetic_text import SyntheticText
from data.tokenizer import load_tokenizer

# Added to data.seed: the training shards are written with data.seed itself.
HELDOUT_SEED_OFFSET = 1_000_003


def heldout_batches(cfg: DataConfig, num_docs: int) -> list[dict]:
    """`num_docs` synthetic documents (seed data.seed + HELDOUT_SEED_OFFSET) packed into batches of
    data.batch_size rows of data.seq_len tokens, in the loader's batch format, plus
    ``caption_mask`` [B, T] bool: the positions whose target is a caption token, i.e. a token of
    the text that follows an image or a video (" a red circle at the top left.")."""
    seed = cfg.seed + HELDOUT_SEED_OFFSET
    tokenizer = load_tokenizer(cfg.tokenizer)
    builder = DocumentBuilder(cfg, tokenizer)
    text = SyntheticText(seed)
    captions: set[tuple[int, ...]] = set()

    def documents():
        for i in range(num_docs):
            segs = synthetic_sample(seed, i, text)
            for prev, seg in zip(segs, segs[1:]):
                if "text" in seg and "text" not in prev:
                    captions.add(tuple(tokenizer.encode(seg["text"])))
            try:
                yield builder.build(encode_sample(f"heldout-{i:06d}", segs))
            except BadSample:
                continue

    docs = documents()
    packer = Packer(cfg.seq_len, cfg.visual_token_cap, tokenizer.pad_id)
    rows = []
    while (row := packer.next_row(lambda: next(docs, None))) is not None:
        rows.append(row)
    pads = (builder.ids.image_pad, builder.ids.video_pad)
    batches = [collate(rows[i:i + cfg.batch_size], pads, cfg.patch_size, cfg.temporal_patch_size)
               for i in range(0, len(rows), cfg.batch_size)]
    for b in batches:
        b["caption_mask"] = caption_mask(b["input_ids"], b["labels"], builder.ids.vision_end, captions)
    return batches


def caption_mask(input_ids: torch.Tensor, labels: torch.Tensor, vision_end: int,
                 captions: set[tuple[int, ...]]) -> torch.Tensor:
    """[B, T] bool: where a caption (one of the token sequences `captions`) follows a
    <|vision_end|>, the positions predicting its tokens (the <|vision_end|> itself predicts the
    first). A caption the packer cut across two rows is left out."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    by_length = sorted({len(c) for c in captions}, reverse=True)
    for b, row in enumerate(input_ids.tolist()):
        for v in (i for i, t in enumerate(row) if t == vision_end):
            for n in by_length:
                if tuple(row[v + 1:v + 1 + n]) in captions:
                    mask[b, v:v + n] = True
                    break
    return mask & (labels != -100)
