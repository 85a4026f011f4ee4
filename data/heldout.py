"""Held-out multimodal batches for end-of-run checks: synthetic documents from a seed the training
shards never use, built and packed exactly as the streaming loader builds and packs its own."""

from __future__ import annotations

from data.config import DataConfig
from data.documents import DocumentBuilder
from data.format import BadSample, encode_sample
from data.mm_packing import MultimodalPacker, collate_rows
from data.synthetic import synthetic_sample
from data.synthetic_text import SyntheticText
from data.tokenizer import load_tokenizer

# Added to data.seed: the training shards are written with data.seed itself.
HELDOUT_SEED_OFFSET = 1_000_003


def heldout_batches(cfg: DataConfig, num_docs: int) -> list[dict]:
    """`num_docs` synthetic documents (seed data.seed + HELDOUT_SEED_OFFSET) packed into batches of
    data.batch_size rows of data.seq_len tokens, in the loader's batch format."""
    seed = cfg.seed + HELDOUT_SEED_OFFSET
    tokenizer = load_tokenizer(cfg.tokenizer)
    builder = DocumentBuilder(cfg, tokenizer)
    text = SyntheticText(seed)

    def documents():
        for i in range(num_docs):
            try:
                yield builder.build(encode_sample(f"heldout-{i:06d}", synthetic_sample(seed, i, text)))
            except BadSample:
                continue

    docs = documents()
    packer = MultimodalPacker(cfg.seq_len, cfg.max_visual_tokens or cfg.seq_len // 2, tokenizer.pad_id)
    rows = []
    while (row := packer.next_row(lambda: next(docs, None))) is not None:
        rows.append(row)
    return [collate_rows(rows[i:i + cfg.batch_size], builder.ids, cfg.merge_size)
            for i in range(0, len(rows), cfg.batch_size)]
