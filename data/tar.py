"""A streaming reader of tar shards: the name and the bytes of every regular file, in order.

Python's tarfile, which webdataset reads shards with, builds a TarInfo of a dozen fields per member
in Python code; on shards of small samples (a caption and a thumbnail) that was a quarter of the
bare decode cost (62 of 267 us per document, benchmarks/bench_loader.py). This reader slices the
512-byte headers instead (9 us per document):

- formats: ustar (name prefix), GNU (``L`` long names, base-256 sizes) and pax (``path`` and
  ``size`` records), which covers what tar, tarfile and webdataset's writers produce;
- compression (gzip, bzip2, xz) is recognised from the first bytes, as ``tarfile``'s ``r|*`` does;
- a header whose checksum is wrong (a non-tar file, a damaged shard) or a stream that ends inside
  a member raises TarError; the members before it have been handed out.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from typing import BinaryIO, Callable, Iterator

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f)), (b"BZh", bz2.BZ2File),
              (b"\xfd7zXZ\x00", lzma.LZMAFile))


class TarError(Exception):
    """Not a tar stream, a damaged header, or a stream cut inside a member."""


class _Prefixed:
    """A stream's first bytes (already read, to recognise a compression) put back in front of it."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + self.stream.read(n - len(out)) if len(out) < n else out


def _read(stream, n: int) -> bytes:
    """n bytes, fewer only at the end of the stream (pipes may return short reads)."""
    data = stream.read(n)
    while 0 < len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _number(field: bytes) -> int:
    """A numeric header field: octal ASCII, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"header field {field!r} is not a number") from None


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except TarError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the field counts as 8 spaces
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])  # old tars
    return stored == signed


def _pax_records(data: bytes) -> dict[str, str]:
    """``<length> <key>=<value>\\n`` records of a pax extended header."""
    out, pos = {}, 0
    try:
        while pos < len(data) and data[pos:pos + 1] != b"\0":
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError:
        raise TarError(f"bad pax header record at byte {pos}") from None
    return out


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix directory (GNU uses the bytes otherwise)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def open_tar_stream(stream: BinaryIO) -> BinaryIO:
    """`stream`, decompressed when it starts with a gzip, bzip2 or xz signature."""
    head = _read(stream, 6)
    raw = _Prefixed(head, stream)
    for magic, cls in COMPRESSED:
        if head.startswith(magic):
            return cls(raw)
    return raw


def iter_files(stream: BinaryIO) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read) of every regular file of the tar stream (open_tar_stream's result), in order;
    read() returns the file's bytes, once, and must be called before the next file is asked for
    if the bytes are wanted (unread ones are skipped: by a seek on a seekable stream); read.size
    is their number. The header of the next file is read only
    when it is asked for, so a damaged member does not hide that the one before it was whole."""
    pax: dict[str, str] = {}
    long_name = None
    first = True
    seekable = isinstance(stream, (io.BufferedReader, io.FileIO))  # not a pipe or a decompressor
    while True:
        header = _read(stream, BLOCK)
        if not header and not first:
            return  # no end-of-archive blocks: tolerated, as tarfile does
        if header == ZERO_BLOCK:
            return
        if len(header) < BLOCK:
            raise TarError("empty file" if first else "stream ends inside a header")
        if not _checksum_ok(header):
            raise TarError("not a tar file" if first else "header checksum mismatch")
        first = False
        kind = header[156:157]
        size = _number(header[124:136])
        if kind in REGULAR:
            size = int(pax.get("size", size))
        if kind in (b"x", b"g", b"L", b"K"):  # metadata for the next member: read it now
            data = _read(stream, size)
            if len(data) < size:
                raise TarError("stream ends inside a member")
            _read(stream, -size % BLOCK)
            if kind == b"x":
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = pax.get("path") or long_name or _name(header)
        pax, long_name = {}, None
        done = [False]

        def read(size: int = size) -> bytes:
            data = _read(stream, size)
            if len(data) < size:
                raise TarError(f"stream ends inside {name!r}")
            _read(stream, -size % BLOCK)
            done[0] = True
            return data

        read.size = size
        if kind in REGULAR:
            yield name, read
        if not done[0]:
            if seekable and size:  # a file: skip without reading
                stream.seek(size + (-size % BLOCK), 1)
            else:
                read()


def member_index(path: str) -> list[tuple[str, int, int]]:
    """(name, offset of the data, size) of every regular file of an uncompressed tar file, read
    by seeking from header to header (the data is not read). Raises TarError as iter_files does,
    and for a compressed file (it cannot be indexed by offsets)."""
    with open(path, "rb") as f:
        head = f.read(6)
        if any(head.startswith(magic) for magic, _ in COMPRESSED):
            raise TarError("compressed: no offsets")
        length = f.seek(0, 2)
        f.seek(0)
        out = [(name, f.tell(), read.size) for name, read in iter_files(f)]
    if out and out[-1][1] + out[-1][2] > length:  # seeking passes the end of a cut file silently
        raise TarError(f"the file ends inside {out[-1][0]!r}")
    return out
