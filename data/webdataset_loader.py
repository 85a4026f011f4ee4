"""The streaming multimodal loader: webdataset shards -> packed multimodal batches, resumable.

Per rank, ``data.num_workers`` DataLoader workers (or the training process itself when 0) each run
one *slot* pipeline (slot = rank * workers + worker; data/shards.py splits the shards over slots):

    shard stream per source (block-shuffled) -> mixture draw -> decode + process + tokenize
    (data/documents.py) -> pack (data/mm_packing.py) -> collate -> batch

Exact resume. Every step of a slot is a pure function of (seed, slot, what it consumed), so a
slot's state is a few ints: per source, the position of its stream's current block and how much
of it was emitted; the number of mixture draws; the skip counters; and the packer's carried piece,
stored not as tokens and pixels but as the position of its raw sample in its stream plus the
offset of the cut (restoring decodes that one sample again). Workers attach their state to every
batch; the loader keeps the state of the last batch consumed from each worker, and which worker
comes next. A resumed loader rotates the workers' roles so that the DataLoader's round robin
continues where it stopped. Exact resume needs the same data.seed, shards, data-parallel size and
data.num_workers.

Another data-parallel size on resume (``load_state_dict`` given the states of every old rank):
nothing is lost or repeated. Each old slot's unfinished stream is read to the end of the newest
epoch any old slot had reached by one of the new slots (data/shards.py, legacy units), and the
pieces of documents the old packers had carried are finished first; then the new slots split the
next epoch. The batches differ from what the old layout would have yielded (other slots, other
packing). A changed data.num_workers at the same data-parallel size is refused with a message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from typing import Any, Optional

import torch

from data.config import DataConfig, source_specs, validate_data_config
from data.documents import Document, DocumentBuilder
from data.format import BadSample, DataError
from data.mm_packing import MMRow, MultimodalPacker, collate_rows
from data.shards import ShardStream, expand_shards, legacy_units
from data.tokenizer import load_tokenizer
from model.vision_tokens import VisionTokenIds

log = logging.getLogger("data")
STATE_VERSION = 1
KEPT = ("oversized_image",)  # counted with the skips, but the sample is kept (resized down)
LOG_FIRST = 10  # per kind and slot, then every LOG_EVERY-th
LOG_EVERY = 1000


class SlotPipeline:
    """One slot: its source streams, mixture, document builder and packer. ``next_batch()`` -> batch
    dict (see data/mm_packing.py:collate_rows) or None when every source is exhausted."""

    def __init__(self, cfg: DataConfig, tokenizer, sources: dict[str, tuple[list[str], float]],
                 slot: int, num_slots: int):
        self.cfg, self.slot = cfg, slot
        self.tokenizer = tokenizer
        self.ids = VisionTokenIds.from_tokenizer(tokenizer)
        self.skipped: Counter = Counter()
        self.bad_run: Counter = Counter()  # samples skipped in a row, per source
        self._quiet = False
        self.builder = DocumentBuilder(cfg, tokenizer, count=lambda kind: self._skip(kind, ""))
        self.sources = sources
        self.streams = {name: self._stream(name, slot, num_slots) for name in sources}
        # Pieces of documents another layout's packers had carried ({source, ref, offset}, the ref
        # naming its slot): packed before anything else.
        self.pieces: list[dict[str, Any]] = []
        self.weights = {name: w for name, (_, w) in sources.items()}
        self.done: set[str] = set()
        self.draws = 0
        cap = cfg.max_visual_tokens or cfg.seq_len // 2
        self.packer = MultimodalPacker(cfg.seq_len, cap, tokenizer.pad_id, on_skip=self._skip)
        self.batches = 0
        self.exhausted = False

    def _stream(self, name: str, slot: int, num_slots: int) -> ShardStream:
        return ShardStream(self.sources[name][0], slot, num_slots, f"{self.cfg.seed}:{name}",
                           self.cfg.shuffle_buffer, self.cfg.shuffle_shards, self.cfg.epochs,
                           on_bad=self._skip)

    def _skip(self, kind: str, message: str) -> None:
        if self._quiet:
            return
        self.skipped[kind] += 1
        n = self.skipped[kind]
        if message and (n <= LOG_FIRST or n % LOG_EVERY == 0):
            log.warning("data: %s #%d (reader %d): %s", kind, n, self.slot, message)

    def _draw(self) -> Optional[str]:
        live = [n for n in self.weights if n not in self.done]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        # Counter-based: draw k is a pure function of (seed, slot, k), nothing else to checkpoint.
        x = random.Random(f"mix:{self.cfg.seed}:{self.slot}:{self.draws}").random()
        self.draws += 1
        x *= sum(self.weights[n] for n in live)
        for n in live:
            x -= self.weights[n]
            if x < 0:
                return n
        return live[-1]

    def next_doc(self) -> Optional[Document]:
        if self.pieces:
            p = self.pieces.pop(0)
            return self._doc_at(p["source"], p["ref"], p["offset"])
        while True:
            name = self._draw()
            if name is None:
                return None
            stream = self.streams[name]
            ref = stream.state_dict()
            raw = stream.next()
            if raw is None:
                self.done.add(name)
                continue
            where = f"{raw.get('__url__')} sample {raw.get('__key__')!r}"
            try:
                doc = self.builder.build(raw, name)
            except BadSample as e:
                self._skip_sample(name, e.kind, f"{where}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - no sample may stop the run; each is counted
                self._skip_sample(name, "sample_error", f"{where}: {type(e).__name__}: {e}")
                continue
            self.bad_run[name] = 0
            doc.ref = ref
            return doc

    def _skip_sample(self, source: str, kind: str, message: str) -> None:
        """Count a skipped sample; a source whose samples keep failing stops the run (an endless
        source would otherwise loop through its bad samples forever without a batch)."""
        self._skip(kind, message)
        self.bad_run[source] += 1
        limit = self.cfg.max_consecutive_skips
        if limit and self.bad_run[source] >= limit:
            field = f"data.sources.{source}.shards" if self.cfg.sources else "data.shards"
            raise DataError(f"source {source!r} ({field}={source_specs(self.cfg)[source][0]!r}): "
                            f"{self.bad_run[source]} samples in a row skipped (last: {kind}: "
                            f"{message}); check the data, or raise data.max_consecutive_skips")

    def _doc_at(self, name: str, ref: dict, offset: int) -> Document:
        """The piece from ``offset`` of the document whose raw sample is at ``ref`` (resume); a
        ``ref`` with a ``slot`` is a position in another slot's stream (a layout change)."""
        stream = self.streams[name] if "slot" not in ref else self._stream(name, ref["slot"],
                                                                           ref["num_slots"])
        here = stream.state_dict()
        stream.load_state_dict(ref)
        raw = stream.next()
        self._quiet = True
        try:
            doc = self.builder.build(raw, name)
        finally:
            self._quiet = False
            stream.load_state_dict(here)
        doc.ref = ref
        return doc.tail(offset) if offset else doc

    def next_batch(self) -> Optional[dict]:
        # Tensors here are small: with intra-op threads, synchronising them costs milliseconds per
        # op on a loaded machine, 100x the op itself. One thread for the data work, then restore.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._next_batch()
        finally:
            torch.set_num_threads(threads)

    def _next_batch(self) -> Optional[dict]:
        if self.exhausted:
            return None
        rows: list[MMRow] = []
        for _ in range(self.cfg.batch_size):
            row = self.packer.next_row(self.next_doc)
            if row is None:
                break
            rows.append(row)
        if len(rows) < self.cfg.batch_size:
            self.exhausted = True
            if not rows:
                return None
            T, pad = self.cfg.seq_len, self.tokenizer.pad_id
            rows += [MMRow([pad] * T, [T], T) for _ in range(self.cfg.batch_size - len(rows))]
        self.batches += 1
        return collate_rows(rows, self.ids, self.cfg.merge_size, self.cfg.patch_size,
                           self.cfg.temporal_patch_size)

    def state_dict(self) -> dict[str, Any]:
        carry = self.packer.carry
        return {
            "streams": {n: s.state_dict() for n, s in self.streams.items()},
            "draws": self.draws,
            "done": sorted(self.done),
            "carry": None if carry is None else {"source": carry.source, "ref": dict(carry.ref),
                                                 "offset": carry.offset},
            "skipped": dict(self.skipped),
            "batches": self.batches,
            "exhausted": int(self.exhausted),
            **({"pieces": [dict(p) for p in self.pieces]} if self.pieces else {}),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if set(sd["streams"]) != set(self.streams):
            raise ValueError(f"data loader state has sources {sorted(sd['streams'])} but the config "
                             f"has {sorted(self.streams)}")
        for n, s in sd["streams"].items():
            self.streams[n].load_state_dict(s)
        c = sd["carry"]
        self.packer.carry = None if c is None else self._doc_at(c["source"], c["ref"], c["offset"])
        self.draws, self.done = int(sd["draws"]), set(sd["done"])
        self.skipped = Counter(sd["skipped"])
        self.batches, self.exhausted = int(sd["batches"]), bool(sd["exhausted"])
        self.pieces = [dict(p) for p in sd.get("pieces", [])]


class _SlotDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: the pipeline of its logical worker, from its saved state."""

    def __init__(self, cfg: DataConfig, sources, dp_rank: int, dp_world: int, workers: int,
                 states: list[Optional[dict]], offset: int):
        self.cfg, self.sources = cfg, sources
        self.dp_rank, self.dp_world, self.workers = dp_rank, dp_world, workers
        self.states, self.offset = states, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # the training process owns the cores
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        physical = 0 if info is None else info.id
        logical = (physical + self.offset) % self.workers
        tok = load_tokenizer(self.cfg.tokenizer)
        pipe = SlotPipeline(self.cfg, tok, self.sources, self.dp_rank * self.workers + logical,
                            self.dp_world * self.workers)
        if self.states[logical] is not None:
            pipe.load_state_dict(self.states[logical])
        while True:
            batch = pipe.next_batch()
            if batch is None:
                return
            batch["_state"] = {"worker": logical, **pipe.state_dict()}
            yield batch


class WebDatasetLoader:
    """Iterable of batches for one data-parallel rank (tensor-parallel ranks of the same dp rank get
    identical batches). ``next(loader)`` -> dict; see data/mm_packing.py:collate_rows. Also
    ``state_dict()`` / ``load_state_dict()`` (exact resume) and ``metrics()`` (skip counters)."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_world: int = 1):
        validate_data_config(cfg)
        if dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_world={dp_world}) and dp_world >= 1")
        self.cfg, self.dp_rank, self.dp_world = cfg, dp_rank, dp_world
        self.sources = resolve_sources(cfg)
        tok = load_tokenizer(cfg.tokenizer)  # fail at start-up on a bad path or missing tokens
        VisionTokenIds.from_tokenizer(tok)
        self.workers = max(1, cfg.num_workers)
        self.states: list[Optional[dict]] = [None] * self.workers
        self.next_worker = 0  # logical worker of the next batch
        self.batches = 0
        self._it = None

    def _start(self) -> None:
        ds = _SlotDataset(self.cfg, self.sources, self.dp_rank, self.dp_world, self.workers,
                          list(self.states), self.next_worker)
        if self.cfg.num_workers == 0:
            self._it = iter(ds)
        else:
            self._it = iter(torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))

    def __iter__(self) -> "WebDatasetLoader":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        state = batch.pop("_state")
        w = state.pop("worker")
        self.states[w] = state
        self.next_worker = (w + 1) % self.workers
        self.batches += 1
        return batch

    def metrics(self) -> dict[str, int]:
        """Skipped samples so far, by kind, over the workers of this rank, as of the batches
        consumed: ``{"skipped/<kind>": n}``; images kept but resized down: ``resized/<kind>``."""
        total: Counter = Counter()
        for s in self.states:
            if s is not None:
                total.update(s["skipped"])
        return {f"{'resized' if k in KEPT else 'skipped'}/{k}": v for k, v in sorted(total.items())}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "webdataset", "seed": self.cfg.seed,
                "dp_rank": self.dp_rank, "dp_world": self.dp_world, "workers": self.workers,
                "shards": {n: len(u) for n, (u, _) in self.sources.items()},
                "shard_lists": shard_fingerprints(self.sources),
                "batches": self.batches, "next_worker": self.next_worker,
                "states": list(self.states)}

    def load_state_dict(self, sd: dict[str, Any] | list[dict[str, Any]]) -> None:
        """This loader's own state, or a list with the state of every data-parallel rank of the
        run being resumed (in dp-rank order): remapped when their number differs from this run's."""
        if isinstance(sd, list):
            for s in sd:
                self._check(s, ("seed", "shards"))
            same = len(sd) == self.dp_world and sd[0]["workers"] == self.workers
            sd = sd[self.dp_rank] if same else self._remapped(sd)
        self._check(sd, ("seed", "dp_rank", "dp_world", "workers", "shards"))
        self.close()
        self.states = list(sd["states"])
        self.next_worker = int(sd["next_worker"])
        self.batches = int(sd["batches"])

    def _check(self, sd: dict[str, Any], keys: tuple[str, ...]) -> None:
        if sd.get("kind") != "webdataset" or int(sd["version"]) != STATE_VERSION:
            raise ValueError(f"data loader state of kind {sd.get('kind')!r} version "
                             f"{sd.get('version')} is not a webdataset loader state v{STATE_VERSION}")
        self._check_shard_lists(sd.get("shard_lists"))
        here = {"seed": self.cfg.seed, "dp_rank": self.dp_rank, "dp_world": self.dp_world,
                "workers": self.workers,
                "shards": {n: len(u) for n, (u, _) in self.sources.items()}}
        for key in keys:
            if sd[key] != here[key]:
                hint = ""
                if key == "workers":
                    was = "0 or 1" if sd[key] == 1 else sd[key]  # 0 and 1 both read one stream
                    hint = (f"; resume with data.num_workers={was}, or change it together "
                            f"with the data-parallel size (a checkpoint then hands over every "
                            f"rank's state, which remapping needs)")
                raise ValueError(
                    f"data loader state has {key}={sd[key]} but this loader has {key}={here[key]}; "
                    f"exact resume needs the same data.seed, shards, data-parallel size and "
                    f"data.num_workers{hint}")

    def _check_shard_lists(self, saved: Optional[dict[str, str]]) -> None:
        """The stream positions index the shard list: other files, or the same in another order,
        would silently resume elsewhere. (States written before this check have no fingerprint.)"""
        if saved is None or self.cfg.allow_changed_shards:
            return
        here = shard_fingerprints(self.sources)
        for name in sorted(set(saved) & set(here)):
            if saved[name] != here[name]:
                field = f"data.sources.{name}.shards" if self.cfg.sources else "data.shards"
                raise ValueError(
                    f"{field}: the shard list differs from the one the checkpoint was written with "
                    f"(other files or another order; {len(self.sources[name][0])} shards now): "
                    f"resuming would not continue where the run stopped; resume with the same "
                    f"shards, or set data.allow_changed_shards=true to continue at the same "
                    f"positions of the new list")

    def _remapped(self, old: list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's state in this layout from every rank's state of another: the old slots'
        streams as legacy units and their carried pieces, dealt round-robin to the new slots."""
        for r, s in enumerate(old):
            if (s["dp_rank"], s["dp_world"], s["workers"]) != (r, len(old), old[0]["workers"]):
                raise ValueError(f"data loader state {r} of {len(old)} has dp_rank={s['dp_rank']}, "
                                 f"dp_world={s['dp_world']}, workers={s['workers']}: not the "
                                 f"states of one run in data-parallel rank order")
        slots = [w for s in old for w in s["states"]]  # old slot = rank * workers + worker
        n_new = self.dp_world * self.workers
        own, units = {}, {}
        for name in self.sources:
            own[name], units[name] = legacy_units(
                [None if w is None else w["streams"][name] for w in slots], self.cfg.epochs)
        pieces, skipped = [], [Counter() for _ in range(n_new)]
        for slot, w in enumerate(slots):
            if w is None:
                continue
            for p in w.get("pieces", []) + ([w["carry"]] if w["carry"] is not None else []):
                ref = p["ref"] if "slot" in p["ref"] else {**p["ref"], "slot": slot,
                                                           "num_slots": len(slots)}
                pieces.append({**p, "ref": ref})
            skipped[slot % n_new].update(w["skipped"])  # per kind, the sum over slots is kept
        batches = max((w["batches"] for w in slots if w is not None), default=0)
        states = []
        for worker in range(self.workers):
            new = self.dp_rank * self.workers + worker
            streams = {name: {"epoch": own[name], "plan_pos": 0, "sample_pos": 0, "block_no": 0,
                              "emitted": 0, "legacy": units[name][new::n_new]}
                       for name in self.sources}
            states.append({"streams": streams, "draws": 0, "done": [], "carry": None,
                           "pieces": pieces[new::n_new], "skipped": dict(skipped[new]),
                           "batches": batches, "exhausted": 0})
        log.info("%d readers (%d ranks x %d workers) -> %d: the old readers' streams finish "
                 "their epoch on the new ones (%s), then the new layout splits the next",
                 len(slots), len(old), old[0]["workers"], n_new,
                 ", ".join(f"source {n!r}: epoch {e - 1}" for n, e in own.items()))
        return {**old[0], "dp_rank": self.dp_rank, "dp_world": self.dp_world,
                "workers": self.workers, "next_worker": 0,
                "batches": sum(s["batches"] for s in old) // len(old), "states": states}

    def close(self) -> None:
        self._it = None  # a DataLoader iterator shuts its workers down when collected


def shard_fingerprints(sources: dict[str, tuple[list[str], float]]) -> dict[str, str]:
    """name -> a digest of its ordered shard list (a checkpoint keeps this, not the list)."""
    return {name: hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
            for name, (urls, _) in sources.items()}


def resolve_sources(cfg: DataConfig) -> dict[str, tuple[list[str], float]]:
    """name -> (shard URLs, weight); writes synthetic shards first when asked and missing."""
    out = {}
    for name, (spec, weight) in source_specs(cfg).items():
        field = f"data.sources.{name}.shards" if cfg.sources else "data.shards"
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
