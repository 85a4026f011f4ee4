"""The webdataset data path: shard format and writer, synthetic shards, shard lists and their
split, mixtures, exact resume (batch by batch, with workers), and bad input."""

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

import pytest
from PIL import Image

from data import build_loader
from data.config import SourceConfig
from data.format import BadSample, ShardSink, encode_sample, parse_sample
from data.shards import ShardStream, expand_shards, iter_shard_samples, iter_tar_samples, slot_plan
from data.synthetic import synthetic_sample, write_synthetic
from data.synthetic_text import SyntheticText
from data.write import main as write_main
from tests.webdataset_helpers import SMALL, all_batches, assert_same_batch, cfg, png, spec, stream


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
