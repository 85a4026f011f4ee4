"""Shared by the webdataset data tests: small configs, shard specs, one virtual stream, a PNG and
an mp4 made on the spot, batch comparison."""

import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.config import DataConfig
from data.format import encode_sample, tar_member_bytes
from data.loader import resolve_sources
from data.stream import VirtualStream

IMG, VID, VS, VE = 4, 5, 2, 3  # the smoke tokenizer's image / video pads, vision start / end
SMALL = dict(name="webdataset", seq_len=128, batch_size=4, image_min_pixels=1024,
             video_min_pixels=1024, shuffle_buffer=8, virtual_streams=4)


def spec(d, n=3):
    return f"{d}/shard-{{000000..{n - 1:06d}}}.tar"


def cfg(**kw):
    return DataConfig(**{**SMALL, **kw})


def stream(c, tok, index=0, of=1):
    """Virtual stream ``index`` of ``of`` of config ``c``."""
    c = dataclasses.replace(c, virtual_streams=of)
    return VirtualStream(c, tok, resolve_sources(c), index)


def png(w=40, h=40, colour=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def all_batches(loader, limit=10_000):
    out = []
    for b in loader:
        out.append(b)
        if len(out) >= limit:
            break
    return out


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def mp4(frames: list[np.ndarray], fps: int = 8, gop: int | None = None) -> bytes:
    """An mp4 (mpeg4) of [H, W, 3] uint8 frames; with ``gop``: a keyframe every gop frames, at a
    high bit rate (flat frames keep their grey level)."""
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if gop:
            stream.gop_size, stream.bit_rate = gop, 4_000_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def text_shard(path, docs) -> str:
    """A tar of samples (key, files): files {ext: bytes}, or a str, the text of a document."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in docs:
            if isinstance(files, str):
                files = encode_sample(key, [{"text": files}])
            for ext, data in files.items():
                tar.addfile(*tar_member_bytes(f"{key}.{ext}", data))
    return str(path)
