"""Shard lists, their split over readers, and a resumable stream of raw samples per reader.

A *reader* (slot) is one virtual stream of the loader, of ``num_slots = data.virtual_streams``.
Every epoch has its own shard order (seeded), and the slots divide it so that each sample of the
epoch is read by exactly one slot:

- whole rounds of ``num_slots`` shards go one shard per slot;
- the ``m < num_slots`` shards left over (all of them when there are fewer shards than slots) are
  shared: slot s reads leftover shard ``s % m`` and keeps its samples ``i`` with
  ``i % k == s // m``, k being the number of slots on that shard. Such a shard's bytes are read
  by k slots, but each sample is decoded by one.

Within a slot, samples are shuffled in *blocks*: ``block`` consecutive samples are read, permuted
by a seed of (seed, slot, epoch, block number) and emitted. A block can cross shard boundaries, so
with ``block`` at least a shard's size it mixes several shards. The block shuffle was chosen over
webdataset's reservoir buffer for exact resume: a stream's whole state is the position where its
current block started plus how many of its samples were emitted (a few ints); restoring re-reads at
most one block from that position, whereas a reservoir can hold samples from arbitrarily far back.

The slots are the loader's *virtual streams* (data/stream.py): their number is fixed by the config
(``data.virtual_streams``), not by the data-parallel layout, so a stream's state stays valid when
the job is resized.
"""

from __future__ import annotations

import functools
import glob
import logging
import lzma
import os
import random
import re
import zlib
from typing import Any, Callable, Iterator, Optional

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from data.format import BadSample
from data.tar import TarError, iter_files, member_index, open_tar_stream

log = logging.getLogger("data")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # pipe:, http:, s3:, gs:, file: ...


def expand_shards(spec: str, field: str = "data.shards") -> list[str]:
    """A shard spec -> the list of shard URLs/paths, in order.

    Parts separated by "::" are concatenated; each is brace-expanded (``{000..009}``, webdataset's
    rule); a local part with ``*?[`` is a glob. URLs (``pipe:...``, ``http://...``) are kept as is.
    A local file that does not exist or a glob without match raises ValueError naming it.
    """
    if not spec or not spec.strip():
        raise ValueError(f"{field}={spec!r}: no shards given")
    out: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        for url in expand_urls(part):
            if URL.match(url) and not url.startswith("file:"):
                out.append(url)
                continue
            path = os.path.expanduser(url[5:] if url.startswith("file:") else url)
            if any(c in path for c in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise ValueError(f"{field}={spec!r}: the glob {path!r} matches no file")
                out += found
            elif not os.path.exists(path):
                raise ValueError(f"{field}={spec!r}: shard {path!r} does not exist")
            else:
                out.append(path)
    if not out:
        raise ValueError(f"{field}={spec!r}: no shards given")
    return out


def slot_plan(num_shards: int, slot: int, num_slots: int, epoch: int, seed: int,
              shuffle: bool = True) -> list[tuple[int, int, int]]:
    """The shards slot ``slot`` reads in ``epoch``: a list of (shard index, k, r), keeping the
    shard's samples i with i % k == r (k = 1: all of them)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    full = num_shards // num_slots * num_slots
    plan = [(order[i], 1, 0) for i in range(slot, full, num_slots)]
    m = num_shards - full
    if m:
        j = slot % m
        plan.append((order[full + j], len(range(j, num_slots, m)), slot // m))
    return plan


def iter_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: dicts of extension -> bytes plus ``__key__`` and ``__url__``,
    grouping consecutive files by key (webdataset's ``base_plus_ext`` rule). A key that comes back
    after another (a sample's files not adjacent, as `tar -C dir .` leaves them) marks the sample
    ``__split__``: parse_sample then says how to write the shard. A file that repeats within one
    key's run (``a.json a.png a.json a.png``) starts a second sample with that key: both are read.

    A shard that cannot be opened or read raises BadSample("unreadable_shard") before its first
    sample, or BadSample("truncated_shard") after the samples that were complete (the sample cut
    by the damage is not yielded).
    """
    yielded = 0
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - any opener failure is a bad shard
        raise BadSample("unreadable_shard", f"{url}: cannot open: {e}") from None
    try:
        current: Optional[dict[str, Any]] = None
        done: set[str] = set()
        for name, read in iter_files(open_tar_stream(stream)):
            if (member := sample_member(name)) is None:
                continue
            key, ext = member
            new, again = starts_sample(current and current["__key__"], current or (), key, ext)
            if current is not None and new:
                # A new sample starts: the previous one is complete even if this file is damaged.
                yield current
                yielded += 1
                done.add(current["__key__"])
                current = None
            data = read()
            if current is None:
                current = {"__key__": key, "__url__": url}
                if key in done and not again:
                    current["__split__"] = True
            current[ext] = data
        if current is not None:
            yield current
            yielded += 1
    except (TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
        kind = "truncated_shard" if yielded else "unreadable_shard"
        raise BadSample(kind, f"{url}: {type(e).__name__}: {e} (after {yielded} samples)") from None
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - e.g. a pipe whose command failed
            pass


def sample_member(name: str) -> Optional[tuple[str, str]]:
    """(key, lower-case extension) of a tar member that belongs to a sample; None for one that does
    not (no extension, or a ``__`` file such as webdataset's ``__index__``)."""
    key, ext = base_plus_ext(name)
    if key is None or ext is None or os.path.basename(name).startswith("__"):
        return None
    return key, ext.lower()


def starts_sample(current_key: Optional[str], current_exts, key: str, ext: str) -> tuple[bool, bool]:
    """Whether file `key.ext` starts a new sample after the current one (`current_key` with
    extensions `current_exts`; None: no sample yet), and whether it does so as the same key again:
    a file the key's sample already has starts a second sample under that key (two writers, a
    concatenated shard), kept rather than merged over the first. The streamed and the indexed
    readers group by this one rule."""
    again = current_key == key and ext in current_exts
    return current_key != key or again, again


@functools.lru_cache(maxsize=256)
def _sample_index(path: str, mtime_ns: int, size: int) -> Optional[list[tuple[str, bool, list]]]:
    """A local tar's samples as (key, split, [(ext, offset, size)]), grouped as iter_tar_samples
    groups them; None when it cannot be indexed (compressed, damaged: then it is streamed)."""
    try:
        members = member_index(path)
    except (TarError, OSError):
        return None
    out: list[tuple[str, bool, list]] = []
    done: set[str] = set()
    for name, offset, n in members:
        if (member := sample_member(name)) is None:
            continue
        key, ext = member
        new, again = starts_sample(out[-1][0] if out else None,
                                   {e for e, _, _ in out[-1][2]} if out else (), key, ext)
        if new:
            if out:
                done.add(out[-1][0])
            out.append((key, key in done and not again, []))
        out[-1][2].append((ext, offset, n))
    return out


def iter_shard_samples(url: str, keep: Callable[[int], bool]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(index in the shard, sample) of the samples i with keep(i), as iter_tar_samples gives them.
    Virtual streams sharing a shard each keep a part of its samples: a local uncompressed tar is
    indexed once per process and only the kept samples' bytes are read; anything else is streamed
    (every sample read, the kept ones yielded)."""
    path = None if URL.match(url) and not url.startswith("file:") else os.path.expanduser(
        url[5:] if url.startswith("file:") else url)
    index = None
    if path is not None:
        try:
            st = os.stat(path)
            index = _sample_index(path, st.st_mtime_ns, st.st_size)
        except OSError:
            index = None
    if index is None:
        for i, sample in enumerate(iter_tar_samples(url)):
            if keep(i):
                yield i, sample
        return
    try:
        with open(path, "rb") as f:
            for i, (key, split, files) in enumerate(index):
                if not keep(i):
                    continue
                sample: dict[str, Any] = {"__key__": key, "__url__": url}
                if split:
                    sample["__split__"] = True
                for ext, offset, n in files:
                    f.seek(offset)
                    sample[ext] = f.read(n)
                yield i, sample
    except OSError as e:
        raise BadSample("unreadable_shard", f"{url}: {type(e).__name__}: {e}") from None


class ShardStream:
    """The raw samples of one slot of one source, epoch after epoch, block-shuffled, resumable.

    ``next()`` -> raw sample dict, or None once ``epochs`` passes are done. ``state_dict()`` is a
    few ints; ``load_state_dict`` puts the stream back exactly (re-reading at most one block).
    ``on_bad(kind, message)`` is called for each unreadable or truncated shard.
    """

    def __init__(self, urls: list[str], slot: int, num_slots: int, seed: int, block: int,
                 shuffle_shards: bool = True, epochs: Optional[int] = None,
                 on_bad: Callable[[str, str], None] | None = None):
        self.urls, self.slot, self.num_slots, self.seed = urls, slot, num_slots, seed
        self.block_size = max(1, block)
        self.shuffle_shards, self.epochs = shuffle_shards, epochs
        self.on_bad = on_bad or (lambda kind, msg: None)
        # Position where the current block starts: epoch, index in the slot's plan, sample index
        # within that shard (all samples of the shard, taken or not); the block's number; emitted.
        self.epoch, self.plan_pos, self.sample_pos, self.block_no, self.emitted = 0, 0, 0, 0, 0
        self._block: list[dict[str, Any]] = []
        self._next_start = (0, 0, 0)  # where the block after the current one starts
        self._loaded = False
        self._reader: Optional[Iterator] = None  # kept open across blocks: no re-skipping
        self._read_pos = (0, 0, 0)  # where the reader stands

    # ---- reading --------------------------------------------------------------------------------

    def _epoch_reader(self, epoch: int, plan_pos: int, sample_pos: int) -> Iterator[tuple[tuple[int, int, int], dict]]:
        """(position after the sample, sample) for this slot's samples of one epoch from a position."""
        plan = slot_plan(len(self.urls), self.slot, self.num_slots, epoch, self.seed,
                         self.shuffle_shards)
        while plan_pos < len(plan):
            shard, k, r = plan[plan_pos]
            try:
                for i, sample in iter_shard_samples(self.urls[shard],
                                                    lambda i: i >= sample_pos and i % k == r):
                    yield (epoch, plan_pos, i + 1), sample
            except BadSample as e:
                # Of the k slots sharing a shard only the one with r == 0 reports its damage, so it
                # is counted once.
                if r == 0:
                    self.on_bad(e.kind, str(e))
            plan_pos, sample_pos = plan_pos + 1, 0

    def _fill(self) -> None:
        """Read the block starting at (epoch, plan_pos, sample_pos) and permute it; move to the
        next epoch when this one has no sample left."""
        while self.epochs is None or self.epoch < self.epochs:
            start = (self.epoch, self.plan_pos, self.sample_pos)
            if self._reader is None or self._read_pos != start:
                self._reader = self._epoch_reader(*start)
                self._read_pos = start
            block = []
            for pos, sample in self._reader:
                block.append(sample)
                self._read_pos = pos
                if len(block) == self.block_size:
                    break
            if block:
                random.Random(f"block:{self.seed}:{self.slot}:{self.epoch}:{self.block_no}").shuffle(block)
                self._block, self._next_start = block, self._read_pos
                return
            if start == (self.epoch, 0, 0):
                # Fewer samples than streams, or only unreadable shards: this stream ends (its
                # rows are padding) rather than spinning over empty epochs.
                log.warning("data: no readable sample for stream %d of %d in epoch %d of shards "
                            "%s%s: the stream ends", self.slot, self.num_slots, self.epoch,
                            self.urls[:3], " ..." if len(self.urls) > 3 else "")
                break
            self.epoch, self.plan_pos, self.sample_pos, self.block_no = self.epoch + 1, 0, 0, 0
            self._reader = None
        self._block, self._next_start = [], (self.epoch, 0, 0)

    def next(self) -> Optional[dict[str, Any]]:
        """The next raw sample of this slot, or None when all epochs are done."""
        if not self._loaded:
            self._loaded = True
            self._fill()
            del self._block[len(self._block) - self.emitted:]  # resuming mid-block
        if not self._block:
            self.epoch, self.plan_pos, self.sample_pos = self._next_start
            self.block_no, self.emitted = self.block_no + 1, 0
            self._fill()
            if not self._block:
                return None
        self.emitted += 1
        return self._block.pop()

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A few ints."""
        sd: dict[str, Any] = {"epoch": self.epoch, "plan_pos": self.plan_pos,
                              "sample_pos": self.sample_pos, "block_no": self.block_no,
                              "emitted": self.emitted}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Put the stream back to ``sd``; the block is re-read on the next ``next()``."""
        self.epoch, self.plan_pos, self.sample_pos = sd["epoch"], sd["plan_pos"], sd["sample_pos"]
        self.block_no, self.emitted = sd["block_no"], sd["emitted"]
        self._block, self._loaded = [], False

