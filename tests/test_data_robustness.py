"""What hostile data and wrong resumes must not do: crash the trainer, loop forever, or resume
silently on other data."""

import contextlib
import io
import shutil
import signal
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data import build_loader
from data.config import DataConfig, SourceConfig
from data.decode import decode_image
from data.format import DataError, encode_sample
from data.shards import iter_shard_samples, iter_tar_samples
from data.tokenizer import Tokenizer
from tests.webdataset_helpers import text_shard

SMALL = dict(name="webdataset", seq_len=128, batch_size=4, image_min_pixels=1024,
             video_min_pixels=1024, shuffle_buffer=8)


def test_resume_with_another_shard_list_is_refused(syn, tmp_path):
    """Same count, other files or another order: the stream positions would point elsewhere."""
    names = [f"shard-{i:06d}.tar" for i in range(3)]
    loader = build_loader(DataConfig(**SMALL, shards="::".join(str(syn / n) for n in names)))
    next(loader)
    state = loader.state_dict()
    moved = tmp_path / "moved"
    moved.mkdir()
    for n in names:
        shutil.copy(syn / n, moved / n)
    for spec in ("::".join(str(syn / n) for n in reversed(names)),   # reordered
                 "::".join(str(moved / n) for n in names)):          # other files
        other = build_loader(DataConfig(**SMALL, shards=spec))
        with pytest.raises(ValueError, match=r"data.shards: the shard list differs .*"
                                             r"data.allow_changed_shards=true"):
            other.load_state_dict(state)
        allowed = build_loader(DataConfig(**SMALL, shards=spec, allow_changed_shards=True))
        allowed.load_state_dict(state)
        next(allowed)
    same = build_loader(DataConfig(**SMALL, shards="::".join(str(syn / n) for n in names)))
    same.load_state_dict(state)
    next(same)


# ---- image modes ---------------------------------------------------------------------------------


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale [H, W] or RGB [H, W, 3] uint16), written by hand: pillow cannot
    write 16-bit RGB."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    pixels, _ = decode_image(data, 1 << 20)
    return pixels.permute(1, 2, 0).numpy().astype(np.int64)  # [H, W, 3]


RNG = np.random.default_rng(0)
U16 = RNG.integers(0, 65536, size=(6, 7), dtype=np.uint16)
U8 = RNG.integers(0, 256, size=(6, 7, 4), dtype=np.uint8)


def test_16bit_grayscale_is_scaled_not_clipped_to_white():
    want = np.rint(U16 / 257.0)
    got = decoded(png16(U16))
    assert Image.open(io.BytesIO(png16(U16))).mode.startswith("I")
    assert np.abs(got - want[..., None]).max() == 0
    assert got.min() < 100  # pillow's own convert("RGB") gives 255 for every value over 255


def test_16bit_rgb_png_is_scaled():
    rgb = np.stack([U16, U16[::-1], 65535 - U16], axis=-1)
    assert np.abs(decoded(png16(rgb)) - np.rint(rgb / 257.0)).max() <= 1  # pillow keeps the high byte


def test_cmyk_converts_multiplicatively():
    cmyk = U8
    want = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0
    got = decoded(encoded(Image.fromarray(cmyk, "CMYK"), "TIFF"))
    assert np.abs(got - want).max() <= 1


def test_alpha_is_composited_over_white():
    rgba = U8
    a = rgba[..., 3:] / 255.0
    want = rgba[..., :3] * a + 255.0 * (1 - a)
    assert np.abs(decoded(encoded(Image.fromarray(rgba, "RGBA"))) - want).max() <= 1
    la = np.stack([U8[..., 0], U8[..., 3]], axis=-1)
    want = la[..., :1] * a + 255.0 * (1 - a)
    assert np.abs(decoded(encoded(Image.fromarray(la, "LA"))) - want).max() <= 1


def test_palette_and_grayscale_convert_by_lookup():
    gray = U8[..., 0]
    assert np.array_equal(decoded(encoded(Image.fromarray(gray, "L"))), np.repeat(gray[..., None], 3, -1))
    palette = RNG.integers(0, 256, size=(256, 3), dtype=np.uint8)
    p = Image.fromarray(gray, "P")
    p.putpalette(palette.tobytes())
    assert np.array_equal(decoded(encoded(p)), palette[gray].astype(np.int64))
    p.info["transparency"] = int(gray[0, 0])  # that index is transparent: white
    got = decoded(encoded(p, transparency=int(gray[0, 0])))
    assert (got[gray == gray[0, 0]] == 255).all()
    assert np.array_equal(got[gray != gray[0, 0]], palette[gray[gray != gray[0, 0]]].astype(np.int64))


# ---- hostile samples -----------------------------------------------------------------------------


def texts_of(loader, tok, limit=50):
    out = []
    for i, b in enumerate(loader):
        ids = b["input_ids"].flatten().tolist()
        out.append(tok.decode([t for t in ids if t > 5]))
        if i >= limit:
            break
    return " ".join(out)


def test_lone_surrogate_and_any_sample_error_are_skipped_and_counted(tmp_path, tok, monkeypatch):
    lone = {"json": b'{"segments": [{"text": "bad \\ud800 text"}]}'}  # valid JSON, invalid Unicode
    shard = text_shard(tmp_path / "s.tar", [("a", "alpha " * 5), ("b", lone), ("c", "gamma " * 5),
                                            ("d", "delta " * 5)])
    # Any other exception in one sample's processing (here the tokenizer's, on "delta") is a skip.
    real = Tokenizer.encode

    def encode(self, text):
        if "delta" in text:
            raise RuntimeError("tokenizer bug")
        return real(self, text)

    monkeypatch.setattr(Tokenizer, "encode", encode)
    loader = build_loader(DataConfig(**SMALL, shards=shard, epochs=1))
    text = texts_of(loader, tok)
    assert "alpha" in text and "gamma" in text and "delta" not in text
    assert loader.metrics() == {"skipped/invalid_text": 1, "skipped/sample_error": 1}


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging (the old loader looped forever on an all-bad source)."""
    def fire(*_):
        raise TimeoutError(f"no result in {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_source_of_only_bad_samples_fails_naming_it(tmp_path):
    good = text_shard(tmp_path / "good.tar", [(f"g{i}", f"fine text {i} " * 5) for i in range(4)])
    bad = text_shard(tmp_path / "bad.tar", [(f"b{i}", {"json": b"{oops"}) for i in range(7)])
    c = DataConfig(**{**SMALL, "shards": None}, max_consecutive_skips=20,
                   sources={"web": SourceConfig(good, 1.0), "broken": SourceConfig(bad, 1.0)})
    with deadline(60), pytest.raises(DataError, match=r"source 'broken' \(data.sources.broken.shards="
                                                      r".*bad.tar'\): 20 samples in a row skipped "
                                                      r"\(last: invalid_json"):
        for _ in build_loader(c):
            pass


def test_adjacent_samples_with_the_same_key_are_both_read(tmp_path, tok):
    shard = text_shard(tmp_path / "dup.tar", [("k", "first copy"), ("k", "second copy"),
                                              ("m", "third doc")])
    keys = [s["__key__"] for s in iter_tar_samples(shard)]
    assert keys == ["k", "k", "m"]
    # The loader reads a local tar through its index (seeks): the same samples.
    assert [s for _, s in iter_shard_samples(shard, lambda i: True)] == list(iter_tar_samples(shard))
    text = texts_of(build_loader(DataConfig(**SMALL, shards=shard, epochs=1)), tok)
    assert "first" in text and "second" in text and "third" in text


def test_resized_images_are_not_counted_as_skipped(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 10, 10)).save(buf, format="PNG")
    big = encode_sample("big", [{"image": buf.getvalue(), "ext": "png"}, {"text": "a red square"}])
    shard = text_shard(tmp_path / "img.tar", [("big", big)])
    loader = build_loader(DataConfig(**{**SMALL, "image_min_pixels": 1024}, image_max_pixels=64 * 64,
                                     shards=shard, epochs=1))
    next(loader)
    assert loader.metrics() == {"resized/oversized_image": 1}
