"""Interim text loader: synthetic documents -> tokenize -> pack -> batches of CPU tensors.

Data-parallel rank r of W reads global documents ``base + r + k*W`` for k = 0, 1, 2, ... (``base``
is ``data.start_doc`` until the data-parallel size changes); its state is the integer k (``cursor``)
plus the packer's carried tokens, so resuming is exact. It runs in the training process (no
workers): a batch of 8 x 256 tokens is ~15 docs to generate and tokenize, well under a millisecond
of work per document.

A change of data-parallel size on resume (``load_state_dict`` given every old rank's state) loses
and repeats nothing: the documents below the old ranks' frontier that some rank had not reached yet,
and the tails of documents split at a row end, are dealt round-robin to the new ranks, which read
them first and then continue the interleaved stream from the frontier (the new ``base``). The rows
are packed differently from what the old layout would have packed, so the losses after the change
are those of another order of the same documents.
"""

from __future__ import annotations

from data.config import DataConfig, validate_data_config
from data.packing import Packer, PackedRow, collate
from data.synthetic_text import SyntheticText
from data.tokenizer import Tokenizer, load_tokenizer

STATE_VERSION = 2  # 1: before base / pending / tails (read as empty)


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
        self.base = cfg.start_doc  # where this data-parallel layout's interleaved stream starts
        self.cursor = 0  # documents this rank has taken from the interleaved stream
        # Left by an earlier layout, read before the interleaved stream: tails of split documents
        # (eos stripped: the packer appends it again) and whole documents not reached yet.
        self.tails: list[list[int]] = []
        self.pending: list[int] = []
        self.batches = 0  # batches yielded (for logging; not needed for resume)
        self.exhausted = False  # a finite stream has ended and its last batch was yielded

    def _doc_index(self, k: int) -> int:
        return self.base + self.dp_rank + k * self.dp_world

    def _next_doc(self) -> list[int] | None:
        if self.tails:
            return self.tails.pop(0)
        if self.pending:
            return self.tokenizer.encode(self.source[self.pending.pop(0)])
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
        """Plain ints and lists of ints, for a DCP checkpoint."""
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "base": self.base,
            "cursor": self.cursor,
            "batches": self.batches,
            "exhausted": int(self.exhausted),
            "carry": list(self.packer.carry),
            "pending": list(self.pending),
            "tail_lens": [len(t) for t in self.tails],
            "tail_tokens": [t for tail in self.tails for t in tail],
        }

    def load_state_dict(self, sd: dict | list[dict]) -> None:
        """This loader's own state, or a list with the state of every data-parallel rank of the
        run being resumed (in dp-rank order): remapped to this rank when their number differs."""
        if isinstance(sd, list):
            sd = sd[self.dp_rank] if len(sd) == self.dp_world else self._remapped(sd)
        # A different seed or rank layout would be a different stream: refuse rather than silently
        # replaying or skipping documents.
        for key, want in (("seed", self.cfg.seed), ("dp_rank", self.dp_rank), ("dp_world", self.dp_world)):
            if int(sd[key]) != want:
                raise ValueError(
                    f"data loader state has {key}={int(sd[key])} but this loader has {key}={want}; "
                    f"exact resume needs the same data.seed and data-parallel layout (or the "
                    f"states of all data-parallel ranks, to remap)"
                )
        if int(sd["version"]) not in (1, STATE_VERSION):
            raise ValueError(f"data loader state version={int(sd['version'])} must be {STATE_VERSION}")
        self.base = int(sd.get("base", self.cfg.start_doc))
        self.cursor = int(sd["cursor"])
        self.batches = int(sd["batches"])
        self.exhausted = bool(int(sd["exhausted"]))
        self.packer.load_state_dict({"carry": sd["carry"]})
        self.pending = [int(i) for i in sd.get("pending", [])]
        flat, self.tails = [int(t) for t in sd.get("tail_tokens", [])], []
        for n in sd.get("tail_lens", []):
            self.tails.append(flat[:n])
            flat = flat[n:]

    def _remapped(self, states: list[dict]) -> dict:
        """This rank's state in a layout of ``dp_world`` ranks, from all ranks' states of another."""
        old = len(states)
        for r, sd in enumerate(states):
            if (int(sd["dp_rank"]), int(sd["dp_world"]), int(sd["seed"])) != (r, old, self.cfg.seed):
                raise ValueError(
                    f"data loader state {r} of {old} has dp_rank={sd['dp_rank']}, "
                    f"dp_world={sd['dp_world']}, seed={sd['seed']}: expected {r}, {old}, "
                    f"{self.cfg.seed} (the states of one run, in data-parallel rank order)")
        base = int(states[0].get("base", self.cfg.start_doc))
        end = None if self.cfg.num_docs is None else self.cfg.start_doc + self.cfg.num_docs
        # The first document no old rank had taken: everything from it on is untouched.
        taken = [base + r + (int(sd["cursor"]) - 1) * old
                 for r, sd in enumerate(states) if int(sd["cursor"]) > 0]
        frontier = max(taken) + 1 if taken else base
        pending, tails = [], []
        for r, sd in enumerate(states):
            pending += [int(i) for i in sd.get("pending", [])]
            pending += list(range(base + r + int(sd["cursor"]) * old, frontier, old))
            me = TextLoader(self.cfg, self.tokenizer, r, old)
            me.load_state_dict(sd)
            tails += me.tails
            if me.packer.carry:
                tails.append(me.packer.carry[:-1])  # the carry ends with its document's eos
        pending = sorted(i for i in pending if end is None or i < end)
        mine = tails[self.dp_rank::self.dp_world]
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "dp_rank": self.dp_rank,
                "dp_world": self.dp_world, "base": frontier, "cursor": 0,
                "batches": int(states[0]["batches"]), "exhausted": 0, "carry": [],
                "pending": pending[self.dp_rank::self.dp_world],
                "tail_lens": [len(t) for t in mine], "tail_tokens": [t for x in mine for t in x]}


def build_loader(cfg: DataConfig, dp_rank: int = 0, dp_world: int = 1) -> TextLoader:
    """The loader for ``cfg``, with the tokenizer it names (None -> shipped smoke tokenizer)."""
    validate_data_config(cfg)
    return TextLoader(cfg, load_tokenizer(cfg.tokenizer), dp_rank, dp_world)
