"""Packing the webdataset stream into multimodal batches: consistent rows, the loader's fast paths
against the model's reference, cuts that never split an item, visual budgets."""

import io

import torch
from PIL import Image

from data import build_loader
from data.format import encode_sample
from data.packing import best_cut
from model.mrope import mrope_position_ids
from tests.webdataset_helpers import IMG, VID, VS, VE, cfg, png, spec


def test_batches_hold_consistent_multimodal_rows(syn, tok):
    # One thread: the tiny model's forward takes ms, two threads on loaded cores take seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_batches(syn, tok)
    finally:
        torch.set_num_threads(threads)


def _check_batches(syn, tok):
    loader = build_loader(cfg(shards=spec(syn), max_visual_tokens=40))
    from model.config import load_model_config
    from model.language_model import Qwen35LM

    model = Qwen35LM(load_model_config("tiny_vl"))
    saw_video = False
    for _ in range(4):
        b = next(loader)
        ids, labels = b["input_ids"], b["labels"]
        assert ids.shape == labels.shape == (4, 128)
        assert b["position_ids"].shape == (3, 4, 128)
        assert torch.equal(b["position_ids"], mrope_position_ids(
            ids, b.get("image_grid_thw"), b.get("video_grid_thw"), b["cu_seqlens"],
            image_token_id=IMG, video_token_id=VID))
        visual = (ids == IMG) | (ids == VID)
        assert (labels[visual] == -100).all() and not ((labels == IMG) | (labels == VID)).any()
        assert (visual.sum(1) <= 40).all()  # the cap on visual tokens per row
        assert b["num_tokens"] == int((labels != -100).sum())
        assert sum(b["source_tokens"].values()) == int((ids != tok.pad_id).sum())
        # Every image block sits whole inside one segment, with its caption after it.
        starts = (ids.flatten() == VS).nonzero().flatten()
        seg = torch.bucketize(starts, b["cu_seqlens"][1:], right=True)
        ends = (ids.flatten() == VE).nonzero().flatten()
        assert torch.equal(seg, torch.bucketize(ends, b["cu_seqlens"][1:], right=True))
        saw_video |= "video_grid_thw" in b
        with torch.no_grad():
            out = model(ids, position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"], labels=labels,
                        **{k: b[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                             "video_grid_thw") if k in b})
        assert torch.isfinite(out.loss)
    assert saw_video


def test_loader_fast_paths_match_the_model_reference(tok):
    """data/pixels.py (uint8 patches, normalised by the model) and data/positions.py (M-RoPE per
    document, reused for its pieces) give exactly what model/vision_processing.py and
    model/mrope.py give."""
    from data.documents import DocumentBuilder
    from data.pixels import batch_patches, image_patches, video_patches
    from data.synthetic import motion_video
    from model.vision_processing import normalize_patches, process_image, process_video

    g = torch.Generator().manual_seed(0)
    refs, gots = [], []
    for h, w, min_pixels in ((64, 96, 1024), (40, 70, 1024), (40, 70, 65536)):  # as is, down, up
        # [3, H, W] over [H, W, 3] memory, as decoded
        img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)
        refs.append(process_image(img, 16, 2, 2, min_pixels, 1 << 20))
        gots.append(image_patches(img, 16, 2, min_pixels, 1 << 20))
        assert gots[-1].grid_thw == refs[-1].grid_thw
    # A batch's images: each single frame repeated over the temporal patch as it is copied.
    assert torch.equal(normalize_patches(batch_patches(gots, 16, 2)),
                       torch.cat([r.pixel_values for r in refs]))
    frames = torch.randint(0, 256, (7, 48, 64, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)
    for fps, max_pixels in ((2.0, 1 << 20), (None, 20000)):  # sampled; all 7 (odd), resized
        ref = process_video(frames, 4.0, fps, 16, 2, 2, 1024, max_pixels, 4, 64)
        got = video_patches(frames, 4.0, fps, 16, 2, 2, 1024, max_pixels, 4, 64)
        assert (got.grid_thw, got.timestamps) == (ref.grid_thw, ref.timestamps)
        assert torch.equal(normalize_patches(got.pixel_values), ref.pixel_values)

    import random
    gif, cap = motion_video(random.Random(0))
    raw = encode_sample("k", [{"text": "Look:"}, {"image": png(96, 64), "ext": "png"}, {"text": " red."},
                              {"video": gif, "ext": "gif", "fps": 4.0}, {"text": cap + " more text"}])
    doc = DocumentBuilder(cfg(), tok).build(raw)
    assert {it.visual.kind for it in doc.items} == {"image", "video"}
    inside = {c for it in doc.items for c in range(it.start + 1, it.end)}
    for cut in (c for c in range(len(doc.tokens)) if c not in inside):
        piece = doc.tail(cut)
        grids = {k: [it.visual.grid_thw for it in piece.items if it.visual.kind == k] or None
                 for k in ("image", "video")}
        want = mrope_position_ids(torch.tensor([piece.tokens]), *(
            None if v is None else torch.tensor(v) for v in (grids["image"], grids["video"])),
            image_token_id=IMG, video_token_id=VID)
        assert torch.equal(torch.from_numpy(piece.positions), want[:, 0]), cut


def test_best_cut_never_splits_an_item():
    from data.documents import Document, VisualItem
    from model.vision_processing import VisualInput

    v = VisualInput(torch.zeros(4, 1), (1, 2, 2))
    doc = Document(list(range(30)), [VisualItem(5, 11, v, 4), VisualItem(20, 26, v, 4)])
    assert best_cut(doc, 8, 100) == 5
    assert best_cut(doc, 15, 100) == 15
    assert best_cut(doc, 15, 3) == 5
    assert best_cut(doc, 24, 100) == 20
    assert best_cut(doc, 40, 6) == 20
    assert doc.tail(20).items[0].start == 0 and doc.tail(20).offset == 20


def test_photo_sized_images_fit_the_smoke_budgets(tok):
    """A 512x384 photo is sized within experiment=smoke_cpu's row cap (128 visual tokens of a
    256-token row) and packed with its caption, not dropped."""
    from data.documents import DocumentBuilder
    from data.packing import Packer
    from train.main import load_config

    c = load_config(["experiment=smoke_cpu"]).data
    buf = io.BytesIO()
    Image.new("RGB", (512, 384), (20, 90, 160)).save(buf, "JPEG")
    counted = []
    doc = DocumentBuilder(c, tok, count=counted.append).build(
        encode_sample("k", [{"image": buf.getvalue(), "ext": "jpg"}, {"text": " a blue photo"}]))
    assert 64 < doc.num_visual <= c.seq_len // 2 and counted == ["oversized_image"]
    skipped = []
    docs = iter([doc])
    row = Packer(c.seq_len, c.seq_len // 2, tok.pad_id, on_skip=lambda *a: skipped.append(a)).next_row(
        lambda: next(docs, None))
    assert not skipped and len(row.images) == 1 and row.tokens[:len(doc.tokens)] == doc.tokens


def test_a_dropped_visual_takes_its_caption_with_it():
    from data.documents import Document, VisualItem
    from data.packing import Packer
    from model.vision_processing import VisualInput

    big = Document([VS] + [IMG] * 10 + [VE, 50, 51, 0],
                   [VisualItem(0, 12, VisualInput(torch.zeros(40, 1), (1, 4, 10)), 10)])
    docs = iter([big, Document([60, 61, 0])])
    skipped = []
    p = Packer(seq_len=8, max_visual_tokens=8, pad_id=1, on_skip=lambda kind, msg: skipped.append(kind))
    row = p.next_row(lambda: next(docs, None))
    assert skipped == ["visual_over_cap"] and row.tokens == [60, 61, 0, 1, 1, 1, 1, 1]
