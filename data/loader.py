"""The one loader: virtual streams -> rows in a fixed global order -> this rank's micro-batches.

Batches are a function of the config and the step, not of the layout. The data is
``data.virtual_streams`` = V deterministic streams (data/stream.py: reader + mixture + packer
each). Global row g of the run (g = 0, 1, 2, ...; step s trains on rows s*G .. s*G + G - 1, G the
global batch) is row g // V of stream g % V. Data-parallel rank r of D takes the rows g = r + D*i,
i = 0, 1, 2, ..., so it reads the V/D streams v = r + D*j (D must divide V), and its micro-batches
are runs of ``data.batch_size`` consecutive rows of that sequence. Which rank, micro-batch or
worker makes a row changes nothing in it: one process with grad_accum=k and k ranks train on the
same rows (the loss is a token-weighted sum over them, trainer.py).

Loader workers (``data.num_workers`` = W, which must divide V/D) split the rank's streams: worker
w makes the rows i = i0 + w + W*t, whose streams are fixed per worker since W divides V/D. It sends
the rows as numpy arrays (data/packing.py:row_arrays) in chunks of ``data.batch_size`` rows; the
training process takes them back in row order (the DataLoader's round robin over workers) and
stacks them. Each row comes with its stream's state after it, so the loader's state is every
stream's state as of the rows consumed, plus the number of global rows consumed: no per-rank or
per-worker part. Resuming under another data-parallel size or worker count (``load_state_dict``
given every old rank's state) picks each stream's state from whichever old rank held it and
continues the same trajectory.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, deque
from typing import Any, Iterator, Optional

import numpy as np
import torch

from data.config import DataConfig, source_specs, validate_data_config
from data.packing import row_arrays, stack
from data.shards import expand_shards
from data.stream import VirtualStream
from data.tokenizer import load_tokenizer
from model.vision_tokens import VisionTokenIds

log = logging.getLogger("data")
STATE_VERSION = 2  # 1: per-rank slot states (data/webdataset_loader.py), not readable here
KEPT = ("oversized_image",)  # counted with the skips, but the sample is kept (resized down)
Sources = dict[str, tuple[Optional[list[str]], float]]


def check_layout(cfg: DataConfig, dp_world: int) -> None:
    """Raise ValueError unless the virtual streams split evenly over ranks and workers."""
    v, w = cfg.virtual_streams, max(1, cfg.num_workers)
    if v % dp_world:
        raise ValueError(f"data.virtual_streams={v} must be a multiple of the data-parallel size "
                         f"{dp_world} (each rank reads a fixed share of the streams); raise it")
    if (v // dp_world) % w:
        raise ValueError(f"data.num_workers={cfg.num_workers} must divide data.virtual_streams / "
                         f"data-parallel size = {v} / {dp_world} = {v // dp_world} (each worker "
                         f"serves a fixed share of its rank's streams)")


def _as_is(chunk):
    return chunk


class _Rows(torch.utils.data.IterableDataset):
    """What each DataLoader worker (or the training process, W = 0) runs: the rows i = start + p +
    W*t of its rank (p its worker id), in chunks; each row as (i, stream, row arrays, stream state)."""

    def __init__(self, cfg: DataConfig, tokenizer, sources: Sources, mine: list[int], states: dict,
                 start: int, workers: int, chunk: int):
        self.cfg, self.tokenizer, self.sources = cfg, tokenizer, sources
        self.mine, self.states, self.start, self.workers, self.chunk = mine, states, start, workers, chunk

    def __iter__(self) -> Iterator[list[tuple[int, int, dict, dict]]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # the training process owns the cores
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        p = 0 if info is None else info.id
        cfg, tok = self.cfg, self.tokenizer
        try:
            ids = VisionTokenIds.from_tokenizer(tok)
            pads = (ids.image_pad, ids.video_pad)
        except KeyError:
            pads = ()
        streams: dict[int, VirtualStream] = {}
        i = self.start + p
        while True:
            out = []
            for _ in range(self.chunk):
                v = self.mine[i % len(self.mine)]
                s = streams.get(v)
                if s is None:
                    s = streams[v] = VirtualStream(cfg, tok, self.sources, v)
                    if self.states.get(v) is not None:
                        s.load_state_dict(self.states[v])
                row = s.next_row()
                out.append((i, v, row_arrays(row, pads, cfg.patch_size, cfg.temporal_patch_size),
                            s.state_dict()))
                i += self.workers
            yield out


class Loader:
    """Iterable of micro-batches for data-parallel rank ``dp_rank`` of ``dp_world`` (tensor- and
    pipeline-parallel ranks of the same dp rank get identical batches). ``next(loader)`` -> dict,
    see data/packing.py:stack, plus ``row_index`` [B] int64: the global row number of each row
    (step s holds rows s*G .. s*G + G - 1). Also ``state_dict()`` / ``load_state_dict()`` and
    ``metrics()`` (skip counters of this rank's streams)."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_world: int = 1):
        validate_data_config(cfg)
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world}) and dp_world >= 1")
        check_layout(cfg, dp_world)
        self.cfg, self.dp_rank, self.dp_world = cfg, dp_rank, dp_world
        self.sources = resolve_sources(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer)  # fails at start-up on a bad path
        self.fingerprints = shard_fingerprints(self.sources)  # the sources are fixed from here
        self.mine = list(range(dp_rank, cfg.virtual_streams, dp_world))  # rank row i: mine[i % n]
        self.workers = max(1, cfg.num_workers)
        self.states: dict[int, Optional[dict]] = {v: None for v in self.mine}
        self.consumed = 0  # rows of this rank taken (i)
        self.exhausted = False
        self._it = None
        self._buffers: list[deque] = []

    # ---- iteration -----------------------------------------------------------------------------

    def _start(self) -> None:
        ds = _Rows(self.cfg, self.tokenizer, self.sources, self.mine, dict(self.states), self.consumed,
                   self.workers, self.cfg.batch_size)
        if self.cfg.num_workers == 0:
            self._it = iter(ds)
        else:
            # collate_fn: keep the numpy arrays (the default turns each into a tensor, sent through
            # its own shared-memory file: ~60 per batch, most of the training process's cost).
            self._it = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_as_is,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))
        self._buffers = [deque() for _ in range(self.workers)]

    def _row(self) -> tuple[int, dict]:
        """This rank's next row (i, arrays), in row order, updating its stream's state."""
        i = self.consumed
        buf = self._buffers[(i - self._first) % self.workers]
        if not buf:
            chunk = next(self._it)  # the round robin hands out this worker's next chunk
            assert chunk[0][0] == i, (chunk[0][0], i)
            buf.extend(chunk)
        j, v, arrays, state = buf.popleft()
        self.states[v] = state
        self.consumed += 1
        return j, arrays

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> dict:
        if self.exhausted:
            raise StopIteration
        if self._it is None:
            self._first = self.consumed
            self._start()
        rows = [self._row() for _ in range(self.cfg.batch_size)]
        batch = stack([a for _, a in rows])
        batch["row_index"] = torch.from_numpy(
            self.dp_rank + self.dp_world * np.array([i for i, _ in rows], dtype=np.int64))
        if batch["num_tokens"] == 0 and all(s is not None and s["ended"] for s in self.states.values()):
            self.exhausted = True  # every stream of this rank has ended
            raise StopIteration
        return batch

    def close(self) -> None:
        self._it = None  # a DataLoader iterator shuts its workers down when collected

    # ---- state -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        """Skipped samples so far, by kind, over this rank's streams, as of the rows consumed:
        ``{"skipped/<kind>": n}``; images kept but resized down: ``resized/<kind>``."""
        total: Counter = Counter()
        for s in self.states.values():
            if s is not None:
                total.update(s["skipped"])
        return {f"{'resized' if k in KEPT else 'skipped'}/{k}": v for k, v in sorted(total.items())}

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.cfg.seed, "virtual_streams": self.cfg.virtual_streams,
                "seq_len": self.cfg.seq_len,
                "sources": {n: None if u is None else len(u) for n, (u, _) in self.sources.items()}}

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, strings, lists and dicts: the global rows consumed and this rank's streams."""
        return {"version": STATE_VERSION, "kind": "streams", **self._identity(),
                "shard_lists": self.fingerprints,
                "rows": self.consumed * self.dp_world,
                "streams": {str(v): s for v, s in self.states.items()}}

    def load_state_dict(self, sd: dict[str, Any] | list[dict[str, Any]]) -> None:
        """This rank's own state, or the states of every data-parallel rank of the run being
        resumed (any data-parallel size or worker count): the same trajectory continues."""
        states = sd if isinstance(sd, list) else [sd]
        here = self._identity()
        merged: dict[int, Optional[dict]] = {}
        for s in states:
            if s.get("kind") != "streams" or int(s.get("version", 0)) != STATE_VERSION:
                raise ValueError(f"data loader state of kind {s.get('kind')!r} version "
                                 f"{s.get('version')} is not a virtual-stream state "
                                 f"v{STATE_VERSION}: it was written by an older loader")
            for key, want in here.items():
                if s[key] != want:
                    raise ValueError(f"data loader state has {key}={s[key]} but this run has "
                                     f"{key}={want}; the same trajectory needs the same data.seed, "
                                     f"data.virtual_streams, data.seq_len and shards")
            self._check_shard_lists(s.get("shard_lists"))
            if s["rows"] != states[0]["rows"]:
                raise ValueError(f"data loader states disagree on the rows consumed "
                                 f"({s['rows']} vs {states[0]['rows']}): not one checkpoint")
            merged.update({int(v): st for v, st in s["streams"].items()})
        rows = int(states[0]["rows"])
        if rows % self.dp_world:
            raise ValueError(f"the checkpoint consumed {rows} global rows, not a multiple of the "
                             f"data-parallel size {self.dp_world}: the global batch must divide by "
                             f"data-parallel size x train.grad_accum")
        missing = [v for v in self.mine if v not in merged]
        if missing:
            raise ValueError(f"data loader state lacks streams {missing[:8]}: resuming under "
                             f"another data-parallel size needs the states of every old rank")
        self.close()
        self.states = {v: merged[v] for v in self.mine}
        self.consumed = rows // self.dp_world
        self.exhausted = False

    def _check_shard_lists(self, saved: Optional[dict[str, str]]) -> None:
        """The stream positions index the shard list: other files, or the same in another order,
        would silently resume elsewhere."""
        if saved is None or self.cfg.allow_changed_shards:
            return
        here = self.fingerprints
        for name in sorted(set(saved) & set(here)):
            if saved[name] != here[name]:
                raise ValueError(
                    f"{self.cfg.shards_field(name)}: the shard list differs from the one the "
                    f"checkpoint was written with (other files or another order; "
                    f"{len(self.sources[name][0])} shards now): resuming would not continue "
                    f"where the run stopped; resume with the same shards, or set "
                    f"data.allow_changed_shards=true to continue at the same positions of the "
                    f"new list")


def shard_fingerprints(sources: Sources) -> dict[str, str]:
    """name -> a digest of its ordered shard list (a checkpoint keeps this, not the list)."""
    return {name: hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
            for name, (urls, _) in sources.items() if urls is not None}


def build_loader(cfg: DataConfig, dp_rank: int = 0, dp_world: int = 1) -> Loader:
    """The loader of data-parallel rank ``dp_rank`` of ``dp_world``; shard specs are checked here."""
    return Loader(cfg, dp_rank, dp_world)


def resolve_sources(cfg: DataConfig) -> Sources:
    """name -> (shard URLs, weight), or {"default": (None, 1.0)} for synthetic text; writes
    synthetic shards first when asked and missing."""
    if cfg.name == "synthetic_text":
        return {"default": (None, 1.0)}
    out: Sources = {}
    for name, (spec, weight) in source_specs(cfg).items():
        field = cfg.shards_field(name)
        try:
            urls = expand_shards(spec, field)
        except ValueError as missing:
            if not cfg.generate_synthetic:
                raise
            from data.synthetic import write_for_spec

            try:
                write_for_spec(spec, cfg.seed)
            except ValueError as e:
                raise ValueError(f"{missing}; and {e}") from None
            urls = expand_shards(spec, field)
        out[name] = (urls, weight)
    return out
