"""The webdataset data path: shard format and writer, synthetic shards, shard lists and their
split, packing, mixtures, exact resume (batch by batch, with workers), and bad input."""

import dataclasses
import inspect
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_loader
from data.config import DataConfig, SourceConfig
from data.format import BadSample, ShardSink, encode_sample, parse_sample
from data.packing import best_cut
from data.shards import ShardStream, expand_shards, iter_shard_samples, iter_tar_samples, slot_plan
from data.synthetic import synthetic_sample, write_synthetic
from data.synthetic_text import SyntheticText
from data.tokenizer import load_tokenizer
from data.loader import resolve_sources
from data.stream import VirtualStream
from data.write import main as write_main
from model.mrope import mrope_position_ids

IMG, VID, VS, VE = 4, 5, 2, 3
SMALL = dict(name="webdataset", seq_len=128, batch_size=4, image_min_pixels=1024,
             video_min_pixels=1024, shuffle_buffer=8, virtual_streams=4)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    write_synthetic(str(d), seed=3, num_shards=3, docs_per_shard=24)
    return d


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


# ---- format, writer, synthetic --------------------------------------------------------------


def test_writer_cli_builds_shards_and_reports_skips(tmp_path, capsys, tok):
    media = tmp_path / "in"
    media.mkdir()
    (media / "a.png").write_bytes(png())
    (media / "broken.png").write_bytes(b"not an image")
    lines = [
        {"image": "a.png", "caption": "a red square"},
        {"text": "plain text document"},
        {"segments": [{"text": "Look:"}, {"image": "a.png"}, {"text": " red."}]},
        {"image": "missing.png", "caption": "x"},
        {"image": "broken.png", "caption": "x"},
        {"segments": []},
    ]
    manifest = media / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "cat.png").write_bytes(png(colour=(0, 0, 200)))
    (folder / "cat.txt").write_text("a blue square")
    (folder / "note.txt").write_text("just text")
    out = tmp_path / "shards"
    assert write_main(["--out", str(out), "--manifest", str(manifest), "--folder", str(folder),
                       "--shard-size", "0.0005"]) == 0
    report = capsys.readouterr()
    assert "wrote 5 documents" in report.out
    assert "skipped 4 inputs" in report.out and "invalid_json 1" in report.out
    assert "missing_file 1" in report.out and "bad_image 1" in report.out
    assert "empty_document 1" in report.out
    shards = sorted(out.glob("*.tar"))
    assert len(shards) > 1  # the size target splits them
    samples = [s for p in shards for s in iter_tar_samples(str(p))]
    docs = [parse_sample(s) for s in samples]
    assert [d[0].get("text") for d in docs if "text" in d[0]] == ["plain text document", "Look:", "just text"]
    assert docs[0][1] == {"text": " a red square"} and "image" in docs[0][0]
    # The printed spec loads.
    shard_spec = report.out.split("data.shards='")[1].split("'")[0]
    loader = build_loader(cfg(shards=shard_spec, epochs=1, shuffle_shards=False))
    batches = all_batches(loader)
    assert sum(int(b["image_grid_thw"].shape[0]) for b in batches if "image_grid_thw" in b) == 3


def test_synthetic_is_deterministic_and_captions_name_what_is_drawn(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_synthetic(str(a), 5, 2, 8)
    write_synthetic(str(b), 5, 2, 8)
    write_synthetic(str(c), 6, 2, 8)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    text = SyntheticText(5)
    kinds = set()
    for i in range(200):
        segs = synthetic_sample(5, i, text)
        kinds.add(tuple(sorted({k for s in segs for k in ("text", "image", "video") if k in s})))
        if len(segs) == 2 and "image" in segs[0]:
            img = Image.open(io.BytesIO(segs[0]["image"])).convert("RGB")
            cap = segs[1]["text"]  # " a red circle at the top left."
            colour = cap.split()[1]
            where = cap.split(" at the ")[1].rstrip(".")
            row = 0 if "top" in where else 2 if "bottom" in where else 1
            col = 0 if "left" in where else 2 if "right" in where else 1
            cell = img.crop((col * 32, row * 32, col * 32 + 32, row * 32 + 32))
            from data.synthetic import COLOURS
            assert COLOURS[colour] in [c for _, c in cell.getcolors(4096)], (i, cap)
    assert {("image", "text"), ("text", "video"), ("text",), ("image", "text", "video")} <= kinds | {("image", "text", "video")}


# ---- shard lists and their split ----------------------------------------------------------------


def test_shard_specs_braces_globs_pipes_and_errors(syn):
    assert len(expand_shards(spec(syn))) == 3
    assert expand_shards(f"{syn}/*.tar") == expand_shards(spec(syn))
    assert expand_shards(f"{syn}/shard-000000.tar::{syn}/shard-000001.tar")[1].endswith("01.tar")
    url = f"pipe:cat {syn}/shard-000001.tar"
    assert expand_shards(url) == [url]
    assert [s["__key__"] for s in iter_tar_samples(url)] == \
        [s["__key__"] for s in iter_tar_samples(f"{syn}/shard-000001.tar")]
    with pytest.raises(ValueError, match=r"data.shards=.*nope-\*.tar.*matches no file"):
        expand_shards(f"{syn}/nope-*.tar")
    with pytest.raises(ValueError, match=r"shard-000003.tar. does not exist"):
        expand_shards(f"{syn}/shard-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match="data.shards"):
        build_loader(cfg(shards=f"{syn}/missing-*.tar"))


def test_shared_shard_reads_only_the_kept_samples_as_streamed(syn, tmp_path):
    """The local-file index path (seek to the kept samples) gives what streaming the whole shard
    and filtering gives; a cut file falls back to streaming (its damage is reported)."""
    path = f"{syn}/shard-000001.tar"
    keep = lambda i: i % 3 == 1  # noqa: E731
    want = [(i, s) for i, s in enumerate(iter_tar_samples(path)) if keep(i)]
    assert list(iter_shard_samples(path, keep)) == want
    assert list(iter_shard_samples(f"pipe:cat {path}", keep)) == \
        [(i, {**s, "__url__": f"pipe:cat {path}"}) for i, s in want]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(path, "rb").read()[:20000])
    got = []
    with pytest.raises(BadSample, match="after"):
        for i, s in iter_shard_samples(str(cut), keep):
            got.append(i)
    assert got and got == [i for i, _ in want[:len(got)]]


@pytest.mark.parametrize("shards,slots", [(3, 4), (5, 4), (8, 4), (2, 6), (7, 3)])
def test_every_sample_of_an_epoch_is_read_once(tmp_path, shards, slots):
    n = 0
    for s in range(shards):  # shards written by hand, 5 samples each
        path = tmp_path / f"x-{s:06d}.tar"
        with tarfile.open(path, "w") as t:
            for i in range(5):
                data = json.dumps({"segments": [{"text": f"{s}/{i}"}]}).encode()
                info = tarfile.TarInfo(f"k{n:05d}.json")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
                n += 1
    urls = expand_shards(f"{tmp_path}/x-*.tar")
    seen = []
    per_slot = []
    for slot in range(slots):
        st = ShardStream(urls, slot, slots, seed=1, block=4, epochs=1)
        got = []
        while (s := st.next()) is not None:
            got.append(s["__key__"])
        per_slot.append(len(got))
        seen += got
    assert sorted(seen) == [f"k{i:05d}" for i in range(n)]
    assert max(per_slot) - min(per_slot) <= 5  # balanced to within one shard
    assert slot_plan(shards, 0, slots, 0, 1) != slot_plan(shards, 0, slots, 1, 1) or shards < 3


def test_data_parallel_ranks_read_disjoint_samples(syn, tok):
    keys = []
    for rank in range(2):
        pipe = stream(cfg(epochs=1, shards=spec(syn)), tok, rank, 2)
        got = []
        while (d := pipe.next_doc()) is not None:
            got.append((d.ref["epoch"], tuple(d.tokens)))
        keys.append(got)
    assert len(keys[0]) + len(keys[1]) == 72
    # Same rank, same stream: tensor-parallel ranks see identical batches.
    a = build_loader(cfg(shards=spec(syn)), dp_rank=1, dp_world=2)
    b = build_loader(cfg(shards=spec(syn)), dp_rank=1, dp_world=2)
    for _ in range(2):
        assert_same_batch(next(a), next(b))


def epoch_docs(batches, streams) -> list[tuple[int, ...]]:
    """The token ids of the documents packed into ``batches`` (a rank's rows), pieces split across
    rows joined again (a piece's rest is in its stream's next row: stream = row_index % streams);
    padding dropped."""
    docs, part = [], {}
    for b in batches:
        ids, cu = b["input_ids"].flatten().tolist(), b["cu_seqlens"].tolist()
        T = b["input_ids"].shape[1]
        for a, e in zip(cu[:-1], cu[1:]):
            piece = ids[a:e]
            if all(t == 1 for t in piece):  # padding
                continue
            v = int(b["row_index"][a // T]) % streams
            part[v] = part.get(v, []) + piece
            if piece[-1] == 0:  # end of document
                docs.append(tuple(part.pop(v)))
    return docs


# One data-parallel rank's epoch in a process of its own (the test below starts two).
RANK_SCRIPT = inspect.getsource(epoch_docs) + """
import json, sys
from data import build_loader
from data.config import DataConfig
c = DataConfig(**json.loads(sys.argv[1]))
print(json.dumps(epoch_docs(build_loader(c, int(sys.argv[2]), int(sys.argv[3])), c.virtual_streams)))
"""


def test_data_parallel_ranks_as_processes_split_an_epoch(tmp_path):
    """Two ranks in two real processes read disjoint documents whose union is what one process
    reads in the epoch (several shards per rank, plus shards shared sample by sample)."""
    sink = ShardSink(str(tmp_path / "s"), max_bytes=6000)
    for i in range(40):  # every document unique: its tokens name it
        segs = ([{"image": png(32 + i % 3 * 32, 32, (5 * i, 100, 50)), "ext": "png"},
                 {"text": f" picture {i}."}] if i % 4 == 0 else [{"text": f"document {i} " * (3 + i % 50)}])
        sink.write(f"d{i:04d}", encode_sample(f"d{i:04d}", segs))
    sink.close()
    assert len(sink.paths) >= 5
    c = {**SMALL, "shards": f"{tmp_path}/s/*.tar", "epochs": 1}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(c), str(rank), "2"],
                              cwd=root, env=env, stdout=subprocess.PIPE, text=True)
             for rank in range(2)]
    whole = epoch_docs(build_loader(cfg(**c)), 4)  # meanwhile, one process reading everything
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    r0, r1 = ([tuple(d) for d in json.loads(o)] for o in outs)
    assert r0 and r1 and not set(r0) & set(r1)
    assert Counter(r0) + Counter(r1) == Counter(whole)
    assert len(whole) == 40


# ---- packing and batches ----------------------------------------------------------------------


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


# ---- mixtures ----------------------------------------------------------------------------------


def test_mixture_draws_sources_by_weight(tmp_path, tok):
    for name, kinds in (("caps", "image"), ("text", "text")):
        sink = ShardSink(str(tmp_path / name))
        for i in range(40):
            segs = ([{"image": png(), "ext": "png"}, {"text": " red"}] if kinds == "image"
                    else [{"text": "hello world " * 3}])
            sink.write(f"{name}{i:04d}", encode_sample(f"{name}{i:04d}", segs))
        sink.close()
    c = cfg(sources={"caps": SourceConfig(f"{tmp_path}/caps/*.tar", 3.0),
                     "text": SourceConfig(f"{tmp_path}/text/*.tar", 1.0)})
    pipe = stream(c, tok)
    names = [pipe.next_doc().source for _ in range(400)]
    assert 0.68 < names.count("caps") / 400 < 0.82
    b = next(build_loader(c))
    assert set(b["source_tokens"]) == {"caps", "text"}


# ---- exact resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_yields_the_same_batches(syn, tmp_path, workers):
    """Batches after a resume equal the uninterrupted loader's, tensor by tensor, across shuffle
    blocks, epochs, a packer carry and (with workers) the DataLoader's round robin."""
    sink = ShardSink(str(tmp_path / "t"))
    for i in range(30):
        sink.write(f"t{i:04d}", encode_sample(f"t{i:04d}", [{"text": f"document {i} " * (5 + i % 40)}]))
    sink.close()
    c = cfg(sources={"syn": SourceConfig(spec(syn), 2.0),
                     "txt": SourceConfig(f"{tmp_path}/t/*.tar", 1.0)},
            num_workers=workers, shuffle_buffer=16)
    n, k = 7, 5
    ref = build_loader(c)
    want = [next(ref) for _ in range(n + k)]
    ref.close()
    first = build_loader(c)
    got = [next(first) for _ in range(n)]
    for a, b in zip(got, want):
        assert_same_batch(a, b)
    state = first.state_dict()
    assert any(s is not None and s["carry"] is not None for s in state["streams"].values())
    first.close()
    resumed = build_loader(c)
    resumed.load_state_dict(state)
    for i in range(k):
        assert_same_batch(next(resumed), want[n + i])
    resumed.close()
    # Another worker count continues the same batches.
    other = build_loader(dataclasses.replace(c, num_workers=2 - workers))
    other.load_state_dict(state)
    assert_same_batch(next(other), want[n])
    other.close()


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_skipped_counted_and_loses_no_valid_sample(tmp_path, tok, caplog):
    good = []

    def text_doc(i):
        good.append(f"good {i}")
        return {"json": json.dumps({"segments": [{"text": f"good {i}"}]}).encode()}

    samples = [
        text_doc(0),
        {"json": json.dumps({"segments": [{"image": "1.png"}, {"text": " good img"}]}).encode(),
         "1.png": png(3000, 2000)},                                       # oversized: resized, kept
        {"json": b"{not json"},                                           # invalid_json
        {"1.png": png()},                                                 # missing_json
        {"json": json.dumps({"segments": [{"image": "1.png"}]}).encode(), "1.png": b""},  # bad_image
        {"json": json.dumps({"segments": [{"image": "1.png"}]}).encode(), "1.png": b"\x89PNG garbage"},
        {"json": json.dumps({"segments": [{"video": "1.gif"}]}).encode(), "1.gif": b"GIF89a broken"},
        {"json": json.dumps({"segments": [{"video": "1.mp4"}]}).encode(), "1.mp4": b"\x00" * 64},
        {"json": json.dumps({"segments": [{"image": "9.png"}]}).encode()},  # missing_key
        {"json": json.dumps({"segments": [{"text": ""}]}).encode()},        # empty_document
        text_doc(1),
    ]
    d = tmp_path / "bad"
    d.mkdir()
    with tarfile.open(d / "a-000000.tar", "w") as t:
        for i, s in enumerate(samples):
            for ext, data in s.items():
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    # A truncated shard: its complete samples are kept.
    with tarfile.open(d / "a-000001.tar", "w") as t:
        for i in range(3):
            s = text_doc(10 + i)
            info = tarfile.TarInfo(f"u{i:03d}.json")
            info.size = len(s["json"])
            t.addfile(info, io.BytesIO(s["json"]))
        big = b"x" * 5000
        info = tarfile.TarInfo("u999.json")
        info.size = len(big)
        t.addfile(info, io.BytesIO(big))
    raw = (d / "a-000001.tar").read_bytes()
    (d / "a-000001.tar").write_bytes(raw[:3 * 1024 + 512 + 1000])
    (d / "a-000002.tar").write_bytes(b"this is not a tar file at all" * 40)  # non-tar
    # A sample whose files are not adjacent (`tar -C dir .` order): missing_key, then split_sample.
    with tarfile.open(d / "a-000003.tar", "w") as t:
        split = json.dumps({"segments": [{"image": "1.png"}, {"text": " split"}]}).encode()
        for name, data in (("z.json", split), ("y.json", text_doc(20)["json"]), ("z.1.png", png())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    c = cfg(shards=f"{d}/a-*.tar", epochs=1, shuffle_shards=False, image_max_pixels=256 * 256)
    pipe = stream(c, tok)
    texts = []
    with caplog.at_level("WARNING", logger="data"):
        while (doc := pipe.next_doc()) is not None:
            texts.append(tok.decode([t for t in doc.tokens if t > 5]))
    assert sorted(t for t in texts if t.startswith("good ")) == sorted(good)
    assert " good img" in texts
    from data.decode import has_video_decoder
    video_kind = "bad_video" if has_video_decoder() else "no_video_decoder"
    want = {"oversized_image": 1, "invalid_json": 1, "missing_json": 1, "bad_image": 2,
            "missing_key": 2, "empty_document": 1, "truncated_shard": 1, "unreadable_shard": 1,
            "split_sample": 1}
    want["bad_video"] = 1 + (video_kind == "bad_video")
    if video_kind == "no_video_decoder":
        want["no_video_decoder"] = 1
    assert dict(pipe.skipped) == want
    assert "truncated_shard" in caplog.text and "invalid_json" in caplog.text
    assert "--sort=name" in caplog.text
    # Through the loader: counters as metrics.
    loader = build_loader(c)
    all_batches(loader)
    assert loader.metrics()["skipped/invalid_json"] == 1


def test_img2dataset_shards_are_image_caption_documents(tmp_path, tok):
    """The common image-text layout (<key>.jpg + <key>.txt caption + a metadata <key>.json
    without segments, or no JSON) reads as [image, caption] documents."""
    d = tmp_path / "i2d"
    d.mkdir()
    meta = json.dumps({"url": "http://example.com/a.jpg", "caption": "ignored", "width": 96}).encode()
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, "JPEG")
    with tarfile.open(d / "i2d-000000.tar", "w") as t:
        for key, files in (("000", {"jpg": buf.getvalue(), "txt": b"a red photo", "json": meta}),
                           ("001", {"jpg": buf.getvalue(), "txt": b"another red photo"}),
                           ("002", {"json": meta})):  # metadata alone: still invalid
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    c = cfg(shards=f"{d}/i2d-000000.tar", epochs=1, shuffle_shards=False)
    pipe = stream(c, tok)
    docs = []
    while (doc := pipe.next_doc()) is not None:
        docs.append(doc)
    assert [tok.decode([t for t in doc.tokens[doc.items[0].end:] if t > 5]) for doc in docs] == \
        ["a red photo", "another red photo"]
    assert all(doc.items[0].visual.kind == "image" and doc.items[0].start == 0 for doc in docs)
    assert dict(pipe.skipped) == {"invalid_json": 1}


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
    d = tmp_path / "v2d"
    d.mkdir()
    with tarfile.open(d / "v-000000.tar", "w") as t:
        for key, files in (("000", {"mp4": clip, "txt": b"a fading clip", "json": meta}),
                           ("001", {"mp4": clip, "txt": b"the same clip again"})):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    pipe = stream(cfg(shards=f"{d}/v-000000.tar", epochs=1, shuffle_shards=False), tok)
    docs = []
    while (doc := pipe.next_doc()) is not None:
        docs.append(doc)
    assert [tok.decode([t for t in doc.tokens[doc.items[0].end:] if t > 5]) for doc in docs] == \
        ["a fading clip", "the same clip again"]
    assert all(doc.items[0].visual.kind == "video" for doc in docs) and not pipe.skipped
    t, h, w = docs[0].items[0].visual.grid_thw
    assert t == 3  # 3 s at 2 frames per second, 2 frames per temporal patch
