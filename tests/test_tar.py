"""data/tar.py against Python's tarfile: the same files from every format and compression tarfile
writes, and the damage cases."""

import io
import shutil
import subprocess
import tarfile

import pytest

from data.tar import TarError, _number, iter_files, open_tar_stream

FILES = {
    "000001.json": b'{"segments": []}',
    "000001.0.png": bytes(range(256)) * 7,
    "d" * 120 + "/000002.json": b"{}",  # a long name: pax record, GNU 'L' member or ustar prefix
    "caf\u00e9/000003.txt": "\u00e9t\u00e9".encode(),  # non-ASCII: a pax record in pax format
    "000004.empty": b"",
}


def make_tar(fmt=tarfile.PAX_FORMAT, mode="w", files=FILES, extras=True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        if extras:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("somelink")
            link.type, link.linkname = tarfile.SYMTYPE, "000001.json"
            tar.addfile(link)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_all(raw: bytes) -> dict[str, bytes]:
    return {name: read() for name, read in iter_files(open_tar_stream(io.BytesIO(raw)))}


def tarfile_files(raw: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|*") as tar:
        return {i.name: tar.extractfile(i).read() for i in tar if i.isreg()}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["pax", "gnu", "ustar"])
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_same_files_as_tarfile(fmt, mode):
    files = FILES if fmt != tarfile.USTAR_FORMAT else {k: v for k, v in FILES.items() if k.isascii()}
    raw = make_tar(fmt, mode, files)
    assert read_all(raw) == tarfile_files(raw) == files


def test_unread_files_are_skipped_and_a_missing_end_block_is_tolerated():
    raw = make_tar(extras=False)
    names = [name for name, _ in iter_files(open_tar_stream(io.BytesIO(raw)))]  # none read
    assert names == list(FILES)
    body = raw[:raw.rindex(b"\0" * 1024 + b"\0")]  # cut the end-of-archive blocks (and padding)
    body = body[:len(body) - len(body) % 512]
    assert read_all(body) == FILES


def test_damage_raises_after_the_whole_files():
    raw = make_tar(extras=False)
    long_name = raw.index(b"d" * 100)  # in the pax record naming file 3
    got = []
    with pytest.raises(TarError, match="ends inside"):
        for name, read in iter_files(open_tar_stream(io.BytesIO(raw[:long_name + 50]))):
            got.append((name, read()))
    assert got[:2] == list(FILES.items())[:2]
    cut_in_data = raw.index(bytes(range(256))) + 100
    stream = iter_files(open_tar_stream(io.BytesIO(raw[:cut_in_data])))
    name, read = next(stream)
    assert read() == FILES["000001.json"]
    name, read = next(stream)  # the header is whole: the file is named before its bytes fail
    assert name == "000001.0.png"
    with pytest.raises(TarError, match="ends inside"):
        read()
    bad = bytearray(raw)
    bad[1024 + 10] ^= 0xFF  # the second header's name (the first file takes blocks 0 and 1)
    with pytest.raises(TarError, match="checksum"):
        read_all(bytes(bad))


@pytest.mark.parametrize("raw,message", [(b"", "empty"), (b"not a tar file at all " * 40, "not a tar"),
                                         (b"\x1f\x8bnot gzip either" * 10, "")])
def test_not_a_tar(raw, message):
    with pytest.raises((TarError, OSError, EOFError)) as e:
        read_all(raw)
    assert message in str(e.value)


def test_numbers_octal_and_base256():
    assert _number(b"0000644\0") == 0o644
    assert _number(b"        ") == 0
    assert _number(b"\x80" + (9 << 30).to_bytes(11, "big")) == 9 << 30  # GNU: sizes over 8 GiB
    assert _number(b"\xff" * 12) == -1
    with pytest.raises(TarError):
        _number(b"12x4\0")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs a tar program")
@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar"])
def test_archives_of_the_tar_program(tmp_path, fmt):
    """Shards as `tar` writes them (GNU tar's own formats, long and non-ASCII names, a directory
    entry, './' prefixes): the same files as tarfile reads."""
    src = tmp_path / "src"
    files = {k: v for k, v in FILES.items() if fmt != "ustar" or (k.isascii() and len(k) < 100)}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    out = tmp_path / "x.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-cf", str(out), "-C", str(src), "."],
                   check=True)
    raw = out.read_bytes()
    got = read_all(raw)
    assert got == tarfile_files(raw)
    assert {name.removeprefix("./"): data for name, data in got.items()} == files
