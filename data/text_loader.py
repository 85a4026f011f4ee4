"""Interim text loader: synthetic documents -> tokenize -> pack -> batches of CPU tensors.

Data-parallel rank r of W reads global documents ``start_doc + r + k*W`` for k = 0, 1, 2, ...; its
whole state is the integer k (``cursor``) plus the packer's carried tokens, so resuming is exact.
It runs in the training process (no workers): a batch of 8 x 256 tokens is ~15 docs to generate and
tokenize, well under a millisecond of work per document.
"""

from __future__ import annotations

from data.config import DataConfig, validate_data_config
from data.packing import Packer, PackedRow, collate
from data.synthetic_text import SyntheticText
from data.tokenizer import Tokenizer, load_tokenizer

STATE_VERSION = 1


class TextLoader:
    """Iterable of batches; ``next(loader)`` -> dict with

    ``input_ids`` [B, T] int64, ``labels`` [B, T] int64 (shifted; -100 = no target),
    ``position_ids`` [B, T] int64, ``cu_seqlens`` [N+1] int64 (over the flattened B*T tokens),
    ``num_tokens`` int; B = cfg.batch_size, T = cfg.seq_len. See data/packing.py:collate.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_world: int = 1):
        validate_data_config(cfg)
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world}) and dp_world >= 1")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.source = SyntheticText(cfg.seed)  # the only source for now (cfg.name validated)
        self.packer = Packer(cfg.seq_len, tokenizer.eos_id, tokenizer.pad_id)
        self.cursor = 0  # documents this rank has taken from the stream
        self.batches = 0  # batches yielded (for logging; not needed for resume)
        self.exhausted = False  # a finite stream has ended and its last batch was yielded

    def _doc_index(self, k: int) -> int:
        return self.cfg.start_doc + self.dp_rank + k * self.dp_world

    def _next_doc(self) -> list[int] | None:
        i = self._doc_index(self.cursor)
        if self.cfg.num_docs is not None and i >= self.cfg.start_doc + self.cfg.num_docs:
            return None
        self.cursor += 1
        return self.tokenizer.encode(self.source[i])

    def __iter__(self) -> "TextLoader":
        return self

    def __next__(self) -> dict:
        if self.exhausted:
            raise StopIteration
        rows: list[PackedRow] = []
        for _ in range(self.cfg.batch_size):
            row = self.packer.next_row(self._next_doc)
            if row is None:
                break
            rows.append(row)
        if not rows:
            self.exhausted = True
            raise StopIteration
        if len(rows) < self.cfg.batch_size:
            # The stream ended mid-batch: all-padding rows keep the [B, T] shape (no loss on them).
            self.exhausted = True
            T, pad = self.cfg.seq_len, self.tokenizer.pad_id
            rows += [PackedRow([pad] * T, [T], T) for _ in range(self.cfg.batch_size - len(rows))]
        self.batches += 1
        return collate(rows)

    def state_dict(self) -> dict:
        """Plain ints and a list of ints (the packer carry), for a DCP checkpoint."""
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "cursor": self.cursor,
            "batches": self.batches,
            "exhausted": int(self.exhausted),
            "carry": list(self.packer.carry),
        }

    def load_state_dict(self, sd: dict) -> None:
        # A different seed or rank layout would be a different stream: refuse rather than silently
        # replaying or skipping documents.
        for key, want in (("seed", self.cfg.seed), ("dp_rank", self.dp_rank), ("dp_world", self.dp_world)):
            if int(sd[key]) != want:
                raise ValueError(
                    f"data loader state has {key}={int(sd[key])} but this loader has {key}={want}; "
                    f"exact resume needs the same data.seed and data-parallel layout"
                )
        if int(sd["version"]) != STATE_VERSION:
            raise ValueError(f"data loader state version={int(sd['version'])} must be {STATE_VERSION}")
        self.cursor = int(sd["cursor"])
        self.batches = int(sd["batches"])
        self.exhausted = bool(int(sd["exhausted"]))
        self.packer.load_state_dict({"carry": sd["carry"]})


def build_loader(cfg: DataConfig, dp_rank: int = 0, dp_world: int = 1) -> TextLoader:
    """The loader for ``cfg``, with the tokenizer it names (None -> shipped smoke tokenizer)."""
    validate_data_config(cfg)
    return TextLoader(cfg, load_tokenizer(cfg.tokenizer), dp_rank, dp_world)
