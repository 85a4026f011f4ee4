"""Commit records with checksums, and their verification.

A checkpoint is written under <dir>/.tmp_step_N/ and committed by writing its commit record, the
`COMMITTED` file, then renaming the directory to <dir>/step_N/ (one atomic rename). The record is
JSON: the step and, for every file of the checkpoint, its size and CRC-32:

    {"step": 6, "algorithm": "crc32", "files": {".metadata": {"bytes": 2817, "crc32": "9c1e..."},
                                                "__0_0.distcp": {...}, "__1_0.distcp": {...}}}

Each rank checksums the files it wrote itself (`__<rank>_*.distcp`; DCP's file naming), rank 0
also the `.metadata`, and rank 0 writes the record: no rank reads another's bytes back. A
directory without a record is never a checkpoint; one whose files disagree with its record is
damaged (truncated, zero-length, overwritten or flipped bytes) and is not resumed from.
Records written before checksums existed hold just the step: accepted, reported as unverified.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Optional

MARKER = "COMMITTED"
ALGORITHM = "crc32"
_CHUNK = 16 << 20


def file_checksum(path: Path) -> dict:
    """{"bytes": size, "crc32": 8 hex digits} of one file, read in 16 MiB chunks."""
    crc, n = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)
    return {"bytes": n, ALGORITHM: f"{crc:08x}"}


def own_files(ckpt: Path, rank: int) -> list[str]:
    """The files of a DCP checkpoint directory that `rank` wrote (rank 0 also the .metadata)."""
    names = sorted(p.name for p in ckpt.iterdir() if p.name.startswith(f"__{rank}_"))
    if rank == 0 and (ckpt / ".metadata").exists():
        names.append(".metadata")
    return names


def checksum_files(ckpt: Path, names: list[str]) -> dict[str, dict]:
    return {name: file_checksum(ckpt / name) for name in names}


def write_record(ckpt: Path, step: int, files: dict[str, dict]) -> None:
    """Write and fsync the commit record; after this, renaming `ckpt` commits it."""
    record = {"step": step, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))}
    path = ckpt / MARKER
    with open(path, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_record(ckpt: Path) -> Optional[dict]:
    """The commit record; None for an old record without checksums; ValueError when unreadable."""
    text = (ckpt / MARKER).read_text()
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = None
    if isinstance(record, int):  # an old record: just the step
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise ValueError(f"{MARKER} is not a commit record ({text[:40]!r})")
    return record


def check_files(ckpt: Path, files: dict[str, dict]) -> list[str]:
    """A line per file of `files` (name -> recorded entry) whose size or checksum disagrees."""
    bad = []
    for name, want in sorted(files.items()):
        path = ckpt / name
        if not path.exists():
            bad.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            bad.append(f"{name}: {size} bytes, the commit record says {want['bytes']}"
                       + (" (zero-length)" if size == 0 else " (truncated)" if size < want["bytes"] else ""))
            continue
        got = file_checksum(path)[ALGORITHM]
        if got != want[ALGORITHM]:
            bad.append(f"{name}: {ALGORITHM} {got}, the commit record says {want[ALGORITHM]} "
                       f"(its bytes changed)")
    return bad


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
