"""Shards written by other tools (webdataset's TarWriter, img2dataset, video2dataset) and video
decoding through PyAV and decord."""

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_loader
from tests.webdataset_helpers import cfg, mp4, stream, text_shard


def test_shards_of_webdatasets_own_writer(tmp_path, tok):
    """webdataset.TarWriter's shards in the img2dataset / video2dataset / plain-text layouts read
    as image-caption, video-caption and text documents, through the loader."""
    pytest.importorskip("av")
    import webdataset as wds

    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, "JPEG")
    clip = mp4([np.full((48, 64, 3), 9 * f, np.uint8) for f in range(16)])
    path = tmp_path / "wds-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(4):
            sink.write({"__key__": f"i{i}", "jpg": buf.getvalue(), "txt": f"red photo {i}",
                        "json": {"width": 96, "height": 64}})
            sink.write({"__key__": f"v{i}", "mp4": clip, "txt": f"dark clip {i}",
                        "json": {"duration": 2.0}})
            sink.write({"__key__": f"t{i}", "txt": f"plain note {i}"})
    c = cfg(shards=str(path), epochs=1, shuffle_shards=False, virtual_streams=1, seq_len=256)
    kinds, texts = Counter(), []
    pipe = stream(c, tok)
    while (doc := pipe.next_doc()) is not None:
        kinds[tuple(it.visual.kind for it in doc.items)] += 1
        texts.append(tok.decode([t for t in doc.tokens[doc.items[-1].end if doc.items else 0:] if t > 5]))
    assert not pipe.skipped and kinds == {("image",): 4, ("video",): 4, (): 4}
    assert sorted(texts) == sorted(f"{w} {i}" for w in ("red photo", "dark clip", "plain note")
                                   for i in range(4))
    b = next(build_loader(c))
    assert "pixel_values" in b and "pixel_values_videos" in b



def test_img2dataset_shards_are_image_caption_documents(tmp_path, tok):
    """The common image-text layout (<key>.jpg + <key>.txt caption + a metadata <key>.json
    without segments, or no JSON) reads as [image, caption] documents."""
    meta = json.dumps({"url": "http://example.com/a.jpg", "caption": "ignored", "width": 96}).encode()
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, "JPEG")
    shard = text_shard(tmp_path / "i2d" / "i2d-000000.tar", [
        ("000", {"jpg": buf.getvalue(), "txt": b"a red photo", "json": meta}),
        ("001", {"jpg": buf.getvalue(), "txt": b"another red photo"}),
        ("002", {"json": meta})])  # metadata alone: still invalid
    c = cfg(shards=shard, epochs=1, shuffle_shards=False)
    pipe = stream(c, tok)
    docs = []
    while (doc := pipe.next_doc()) is not None:
        docs.append(doc)
    assert [tok.decode([t for t in doc.tokens[doc.items[0].end:] if t > 5]) for doc in docs] == \
        ["a red photo", "another red photo"]
    assert all(doc.items[0].visual.kind == "image" and doc.items[0].start == 0 for doc in docs)
    assert dict(pipe.skipped) == {"invalid_json": 1}


def test_video_through_pyav_and_decord(tmp_path, tok):
    """PyAV and decord give the same frames of a clip whose red square moves."""
    frames = []
    for f in range(16):
        img = Image.new("RGB", (64, 64), (40, 40, 40))
        img.paste((230, 30, 30), (4 * f, 20, 4 * f + 12, 32))
        frames.append(np.asarray(img))
    clip = mp4(frames)
    from data.decode import decode_video, decord_frames
    every = lambda total, fps, h, w: (list(range(total)), (h, w))  # noqa: E731
    got, fps, kept, size = decode_video(clip, "1.mp4", None, every)  # PyAV
    assert got.shape == (16, 3, 64, 64) and fps == pytest.approx(8) and kept == list(range(16))
    pytest.importorskip("decord")
    ref, ref_fps, _, _ = decord_frames(clip, None, every)
    assert ref_fps == pytest.approx(8) and len(ref) == 16
    # decord (its own ffmpeg build) and PyAV: the same frames up to the YUV -> RGB rounding
    assert (got.permute(0, 2, 3, 1).float() - torch.from_numpy(np.stack(ref)).float()).abs().mean() < 2
    # the moving square: brightest red column moves 4 pixels a frame
    red = got[:, 0, 26].float().argmax(-1)
    assert (red[1:] >= red[:-1]).all() and red[-1] > red[0]


@pytest.mark.parametrize("decoder", ["av", "decord"])
def test_video_decoded_at_the_kept_frames_and_size(decoder, monkeypatch):
    """A clip of 40 frames whose grey level names the frame: the plan's frames come back (found
    by seeking past keyframes), scaled by the decoder to the plan's size."""
    pytest.importorskip(decoder)
    from data import decode

    monkeypatch.setattr(decode, "SEEK_AFTER", 4)  # PyAV seeks to frames 20 and 39
    clip = mp4([np.full((48, 64, 3), 20 + 5 * f, np.uint8) for f in range(40)], gop=5)
    want = [3, 20, 21, 39]
    calls = []

    def plan(total, fps, h, w):
        calls.append((total, fps, h, w))
        return want, (24, 32)

    frames, fps, kept, size = getattr(decode, f"{decoder}_frames")(clip, None, plan)
    assert calls == [(40, pytest.approx(8.0), 48, 64)] and kept == want and size == (24, 32)
    assert [f.shape for f in frames] == [(24, 32, 3)] * 4
    assert [float(f.mean()) for f in frames] == pytest.approx([20 + 5 * i for i in want], abs=2)


def test_video_caption_shards_read_as_documents(tmp_path, tok):
    """video2dataset's layout: <key>.mp4, the caption in <key>.txt, metadata in <key>.json."""
    pytest.importorskip("av")
    clip = mp4([np.full((48, 64, 3), 9 * f, np.uint8) for f in range(24)])
    meta = json.dumps({"url": "http://example.com/v.mp4", "duration": 3.0}).encode()
    shard = text_shard(tmp_path / "v2d" / "v-000000.tar", [
        ("000", {"mp4": clip, "txt": b"a fading clip", "json": meta}),
        ("001", {"mp4": clip, "txt": b"the same clip again"})])
    pipe = stream(cfg(shards=shard, epochs=1, shuffle_shards=False), tok)
    docs = []
    while (doc := pipe.next_doc()) is not None:
        docs.append(doc)
    assert [tok.decode([t for t in doc.tokens[doc.items[0].end:] if t > 5]) for doc in docs] == \
        ["a fading clip", "the same clip again"]
    assert all(doc.items[0].visual.kind == "video" for doc in docs) and not pipe.skipped
    t, h, w = docs[0].items[0].visual.grid_thw
    assert t == 3  # 3 s at 2 frames per second, 2 frames per temporal patch
