"""Pack tokenized documents into fixed-length rows, and collate rows into a training batch.

A row is ``seq_len`` tokens cut into *segments*: each segment is (part of) one document, attends only
to itself and has its own positions from 0. A document longer than the room left in a row is split;
its remainder is carried over and opens the next row as a new segment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    tokens: list[int]  # [seq_len]
    seg_lens: list[int]  # segment lengths, sum == seq_len; a padding tail is its own segment
    num_pad: int  # padding tokens at the end of the row (0 unless the stream ended)


class Packer:
    """Greedy packer with carried state: the tokens of the document split at the last row's end.

    ``next_row(next_doc)`` pulls documents (token lists without eos; the packer appends ``eos_id``)
    from ``next_doc()`` until the row is full; ``next_doc()`` returns ``None`` when the stream has
    ended, and the row is then padded with ``pad_id`` (``None`` if there is nothing left at all).
    """

    def __init__(self, seq_len: int, eos_id: int, pad_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.carry: list[int] = []  # eos included: the tail of a split document

    def next_row(self, next_doc: Callable[[], list[int] | None]) -> PackedRow | None:
        tokens: list[int] = []
        seg_lens: list[int] = []
        room = self.seq_len
        while room > 0:
            if self.carry:
                doc, self.carry = self.carry, []
            else:
                ids = next_doc()
                if ids is None:
                    break
                doc = ids + [self.eos_id]
            take = doc[:room]
            tokens += take
            seg_lens.append(len(take))
            room -= len(take)
            self.carry = doc[len(take):]
        if not tokens:
            return None
        if room:
            tokens += [self.pad_id] * room
            seg_lens.append(room)
        return PackedRow(tokens, seg_lens, room)

    def state_dict(self) -> dict:
        return {"carry": list(self.carry)}

    def load_state_dict(self, sd: dict) -> None:
        self.carry = [int(t) for t in sd["carry"]]


def collate(rows: list[PackedRow]) -> dict:
    """Rows -> batch of CPU tensors (B = len(rows), T = seq_len).

    Returns ``input_ids`` [B, T], ``labels`` [B, T] (already shifted: the next token of the same
    segment, -100 at each segment's last token and on padding), ``position_ids`` [B, T] (from 0 at
    each segment start), ``cu_seqlens`` [N+1] int64 (segment boundaries over the flattened B*T
    tokens, fla varlen convention) and ``num_tokens`` (int, labels that are not -100).
    """
    B, T = len(rows), len(rows[0].tokens)
    input_ids = torch.tensor([r.tokens for r in rows], dtype=torch.long)  # [B, T]
    seg_lens = torch.tensor([n for r in rows for n in r.seg_lens], dtype=torch.long)  # [N]
    cu_seqlens = torch.zeros(len(seg_lens) + 1, dtype=torch.long)
    cu_seqlens[1:] = torch.cumsum(seg_lens, 0)
    flat_pos = torch.arange(B * T) - torch.repeat_interleave(cu_seqlens[:-1], seg_lens)
    position_ids = flat_pos.view(B, T)

    labels_flat = torch.roll(input_ids.view(-1), -1)  # [B*T]: the next token, wrong at segment ends
    labels_flat[cu_seqlens[1:] - 1] = IGNORE_INDEX
    is_pad = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r.num_pad:
            is_pad[b, T - r.num_pad :] = True
    labels = labels_flat.view(B, T)
    labels[is_pad] = IGNORE_INDEX
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "num_tokens": int((labels != IGNORE_INDEX).sum()),
    }


def random_batch(seed: int, rows: int, seq_len: int, vocab: int,
                 doc_len: tuple[int, int] = (4, 20)) -> dict:
    """A batch as the text loader makes it (`Packer`, `collate`) from random documents of
    doc_len[0] .. doc_len[1] - 1 tokens (ids 8 .. vocab - 1, end-of-document 1): what the parallel
    tests and benchmarks train on."""
    g = torch.Generator().manual_seed(seed)
    packer = Packer(seq_len, eos_id=1, pad_id=0)

    def document() -> list[int]:
        n = int(torch.randint(*doc_len, (1,), generator=g))
        return torch.randint(8, vocab, (n,), generator=g).tolist()

    return collate([packer.next_row(document) for _ in range(rows)])
