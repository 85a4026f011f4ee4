"""One virtual stream: its sources' raw samples -> mixture draw -> documents -> packed rows.

The loader (data/loader.py) runs ``data.virtual_streams`` of them, a number fixed by the config,
not by the data-parallel layout. Stream v reads its own share of every source (data/shards.py
slot v, or data/text_source.py), draws the mixture with a counter-based seed of (seed, v, draw),
and packs its own documents, so its rows are a pure function of (config, v, how many rows it has
made) whichever process runs it. Its state is a few ints per source, the draw count, the skip
counters and the packer's carried piece stored as the position of its raw sample plus the offset
of the cut (restoring decodes that one sample again).

An ended stream (finite ``data.epochs`` / ``data.num_docs``, or a source with fewer samples than
streams) yields padding rows, which carry no loss.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any, Optional

import torch

from data.config import DataConfig, source_specs
from data.documents import Document, DocumentBuilder
from data.format import BadSample, DataError
from data.packing import Packer, PackedRow, padding_row
from data.shards import ShardStream
from data.text_source import SyntheticTextStream

log = logging.getLogger("data")
LOG_FIRST = 10  # per kind and stream, then every LOG_EVERY-th
LOG_EVERY = 1000


def where(raw: dict) -> str:
    """A raw sample's shard and key, for messages."""
    return f"{raw.get('__url__')} sample {raw.get('__key__')!r}"


class VirtualStream:
    """Stream ``index`` of ``cfg.virtual_streams``. ``sources``: name -> (shard URLs, weight), or
    ``{"default": (None, 1.0)}`` for data.name=synthetic_text. ``next_row()`` -> PackedRow."""

    def __init__(self, cfg: DataConfig, tokenizer, sources: dict[str, tuple[Optional[list[str]], float]],
                 index: int):
        self.cfg, self.index = cfg, index
        self.tokenizer = tokenizer
        self.skipped: Counter = Counter()
        self.bad_run: Counter = Counter()  # samples skipped in a row, per source
        self._quiet = False
        self.builder = DocumentBuilder(cfg, tokenizer, count=lambda kind: self._skip(kind, ""))
        self.sources = sources
        self.readers = {name: self._reader(name) for name in sources}
        self.weights = {name: w for name, (_, w) in sources.items()}
        self.done: set[str] = set()
        self.draws = 0
        self.packer = Packer(cfg.seq_len, cfg.visual_token_cap, tokenizer.pad_id, on_skip=self._skip)
        self.ended = False

    def _reader(self, name: str):
        urls, c = self.sources[name][0], self.cfg
        if urls is None:
            return SyntheticTextStream(c.seed, self.index, c.virtual_streams, c.start_doc, c.num_docs)
        return ShardStream(urls, self.index, c.virtual_streams, f"{c.seed}:{name}",
                           c.shuffle_buffer, c.shuffle_shards, c.epochs, on_bad=self._skip)

    def _skip(self, kind: str, message: str) -> None:
        if self._quiet:
            return
        self.skipped[kind] += 1
        n = self.skipped[kind]
        if message and (n <= LOG_FIRST or n % LOG_EVERY == 0):
            log.warning("data: %s #%d (stream %d): %s", kind, n, self.index, message)

    def _draw(self) -> Optional[str]:
        live = [n for n in self.weights if n not in self.done]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        # Counter-based: draw k is a pure function of (seed, stream, k), nothing else to checkpoint.
        x = random.Random(f"mix:{self.cfg.seed}:{self.index}:{self.draws}").random()
        self.draws += 1
        x *= sum(self.weights[n] for n in live)
        for n in live:
            x -= self.weights[n]
            if x < 0:
                return n
        return live[-1]

    def next_doc(self) -> Optional[Document]:
        while True:
            name = self._draw()
            if name is None:
                return None
            reader = self.readers[name]
            ref = reader.state_dict()
            raw = reader.next()
            if raw is None:
                self.done.add(name)
                continue
            try:
                doc = self.builder.build(raw, name)
            except BadSample as e:
                self._skip_sample(name, e.kind, f"{where(raw)}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - no sample may stop the run; each is counted
                self._skip_sample(name, "sample_error", f"{where(raw)}: {type(e).__name__}: {e}")
                continue
            self.bad_run[name] = 0
            doc.ref = ref
            return doc

    def _skip_sample(self, source: str, kind: str, message: str) -> None:
        """Count a skipped sample; a source whose samples keep failing stops the run (an endless
        source would otherwise loop through its bad samples forever without a row)."""
        self._skip(kind, message)
        self.bad_run[source] += 1
        limit = self.cfg.max_consecutive_skips
        if limit and self.bad_run[source] >= limit:
            if self.sources[source][0] is None:  # synthetic text
                given = f"data.name={self.cfg.name!r}"
            else:
                given = f"{self.cfg.shards_field(source)}={source_specs(self.cfg)[source][0]!r}"
            raise DataError(f"source {source!r} ({given}): {self.bad_run[source]} samples "
                            f"in a row skipped (last: {kind}: {message}); check the data, or raise "
                            f"data.max_consecutive_skips")

    def _doc_at(self, name: str, ref: dict, offset: int) -> Document:
        """The piece from ``offset`` of the document whose raw sample is at ``ref`` (resume)."""
        reader = self.readers[name]
        here = reader.state_dict()
        reader.load_state_dict(ref)
        raw = reader.next()
        self._quiet = True
        try:
            doc = self.builder.build(raw, name)
        finally:
            self._quiet = False
            reader.load_state_dict(here)
        doc.ref = ref
        return doc.tail(offset) if offset else doc

    def next_row(self) -> PackedRow:
        """The stream's next row; a padding row once it has ended."""
        # Tensors here are small: with intra-op threads, synchronising them costs milliseconds per
        # op on a loaded machine, 100x the op itself. One thread for the data work, then restore.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            row = None if self.ended else self.packer.next_row(self.next_doc)
        finally:
            torch.set_num_threads(threads)
        if row is None:
            self.ended = True
            return padding_row(self.cfg.seq_len, self.tokenizer.pad_id)
        return row

    def state_dict(self) -> dict[str, Any]:
        carry = self.packer.carry
        return {
            "readers": {n: r.state_dict() for n, r in self.readers.items()},
            "draws": self.draws,
            "done": sorted(self.done),
            "carry": None if carry is None else {"source": carry.source, "ref": dict(carry.ref),
                                                 "offset": carry.offset},
            "skipped": dict(self.skipped),
            "ended": int(self.ended),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if set(sd["readers"]) != set(self.readers):
            raise ValueError(f"data loader state has sources {sorted(sd['readers'])} but the config "
                             f"has {sorted(self.readers)}")
        for n, s in sd["readers"].items():
            self.readers[n].load_state_dict(s)
        c = sd["carry"]
        self.packer.carry = None if c is None else self._doc_at(c["source"], c["ref"], c["offset"])
        self.draws, self.done = int(sd["draws"]), set(sd["done"])
        self.skipped = Counter(sd["skipped"])
        self.ended = bool(int(sd["ended"]))
