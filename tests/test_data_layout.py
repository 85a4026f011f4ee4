"""Batches are a function of the config and the step, not of the layout (data/loader.py): the
global batch of every step, row by row, is the same for any data-parallel size, gradient
accumulation and worker count, and a loader resumed under another layout continues it.
In one process (the ranks' loaders side by side); tests/test_data_resize.py runs real ranks."""

import dataclasses

import pytest
import torch

from data.config import DataConfig
from data.loader import build_loader
from tests.webdataset_helpers import IMG, VID

V = 8  # virtual streams: splits over 1, 2, 4 ranks and up to 8 / dp workers


def config(kind: str, spec: str, **kw) -> DataConfig:
    if kind == "text":
        base = dict(name="synthetic_text", seq_len=64)
    else:
        base = dict(name="webdataset", shards=spec, seq_len=128, image_min_pixels=1024,
                    video_min_pixels=1024, shuffle_buffer=4)
    return DataConfig(**{**base, "seed": 3, "virtual_streams": V, **kw})


def runs(ids: torch.Tensor, token: int) -> torch.Tensor:
    """[B] the number of runs of ``token`` in each row of ids [B, T] (one per image; one per
    temporal patch of a video)."""
    hit = ids == token
    starts = hit & ~torch.nn.functional.pad(hit, (1, 0))[:, :-1]
    return starts.sum(1)


def split_rows(batch: dict) -> list[dict]:
    """A micro-batch -> its rows: tokens, labels, M-RoPE positions [3, T], and the patches of the
    row's images and videos (the batch's pixel tensors cut at the rows' visual items)."""
    ids = batch["input_ids"]
    pos = batch["position_ids"]
    pos = pos.unsqueeze(0).expand(3, -1, -1) if pos.dim() == 2 else pos
    rows = [{"input_ids": ids[b], "labels": batch["labels"][b], "positions": pos[:, b],
             "images": [], "videos": []} for b in range(len(ids))]
    for kind, token, key, grid_key in (("images", IMG, "pixel_values", "image_grid_thw"),
                                       ("videos", VID, "pixel_values_videos", "video_grid_thw")):
        if grid_key not in batch:
            continue
        sizes = batch[grid_key].prod(1).tolist()
        chunks = iter(zip(torch.split(batch[key], sizes), batch[grid_key][:, 0].tolist()))
        for b, n in enumerate(runs(ids, token).tolist()):
            while n > 0:  # a video's temporal patches are one run each
                pixels, t = next(chunks)
                rows[b][kind].append(pixels)
                n -= 1 if kind == "images" else t
        assert next(chunks, None) is None
    return rows


def global_batches(cfg: DataConfig, dp: int, accum: int, steps: int, states=None):
    """The rows of each step's global batch in global row order, as dp ranks with ``accum``
    micro-batches each read them; and the ranks' loader states at the end."""
    G = cfg.global_batch_size
    c = dataclasses.replace(cfg, batch_size=G // (dp * accum), global_batch_size=None)
    loaders = [build_loader(c, r, dp) for r in range(dp)]
    if states is not None:
        for loader in loaders:
            loader.load_state_dict(states)
    out, done = [], set()
    for _ in range(steps):
        rows = {}
        for r, loader in enumerate(loaders):
            for _ in range(accum):
                try:
                    b = next(loader)
                except StopIteration:  # a finite stream: every stream of this rank has ended
                    done.add(r)
                    break
                rows.update(zip(b["row_index"].tolist(), split_rows(b)))
        if len(done) == dp:
            break
        first = min(rows) // G * G
        out.append([rows.get(g) for g in range(first, first + G)])  # None: an ended rank's row
        assert len(rows) == G or done
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    return out, states


def assert_same_rows(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for step, (ra, rb) in enumerate(zip(a, b)):
        for g, (x, y) in enumerate(zip(ra, rb)):
            for k in ("input_ids", "labels", "positions"):
                assert torch.equal(x[k], y[k]), (step, g, k)
            for k in ("images", "videos"):
                assert len(x[k]) == len(y[k]) and all(map(torch.equal, x[k], y[k])), (step, g, k)


@pytest.mark.parametrize("kind", ["text", "mm"])
def test_global_batch_is_the_same_in_every_layout(kind, mm_shards):
    cfg = config(kind, mm_shards, global_batch_size=8)
    want, _ = global_batches(cfg, dp=1, accum=1, steps=4)
    assert sum(len(r["images"]) + len(r["videos"]) for s in want for r in s) > 0 or kind == "text"
    for dp, accum, workers in ((1, 2, 0), (2, 1, 2), (4, 1, 0), (2, 2, 1), (1, 1, 2)):
        got, _ = global_batches(dataclasses.replace(cfg, num_workers=workers), dp, accum, 4)
        assert_same_rows(got, want)


@pytest.mark.parametrize("kind", ["text", "mm"])
@pytest.mark.parametrize("old,new", [((2, 0), (4, 2)), ((4, 1), (2, 0)), ((2, 2), (1, 0))])
def test_resized_loader_continues_the_trajectory(kind, old, new, mm_shards):
    """(dp, workers) -> (dp, workers) after 3 steps: steps 4-6 are the uninterrupted run's."""
    cfg = config(kind, mm_shards, global_batch_size=8)
    want, _ = global_batches(cfg, 1, 1, 6)
    first, states = global_batches(dataclasses.replace(cfg, num_workers=old[1]), old[0], 1, 3)
    then, _ = global_batches(dataclasses.replace(cfg, num_workers=new[1]), new[0], 1, 3, states)
    assert_same_rows(first + then, want)


def test_resize_mid_epoch_reads_every_document_once(text_shards, tok):
    """One epoch of unique documents, 2 ranks for 3 steps, then 4 ranks to the end: each document
    is trained on exactly once (its pieces joined again per stream)."""
    cfg = DataConfig(name="webdataset", shards=text_shards, seq_len=64, virtual_streams=V, seed=3,
                     epochs=1, shuffle_buffer=4, global_batch_size=8)
    first, states = global_batches(cfg, 2, 1, 3)
    then, _ = global_batches(dataclasses.replace(cfg, num_workers=2), 4, 1, 100, states)
    steps = first + then
    docs, part = [], {}
    for s, rows in enumerate(steps):
        for j, r in enumerate(rows):
            if r is None:
                continue
            v = (s * 8 + j) % V
            ids = r["input_ids"].tolist()
            cuts = [0] + [t + 1 for t, x in enumerate(ids) if x == tok.eos_id]
            for a, e in zip(cuts, cuts[1:] + [len(ids)]):
                part[v] = part.get(v, []) + [x for x in ids[a:e] if x != tok.pad_id]
                if ids[a:e] and ids[e - 1] == tok.eos_id:
                    docs.append(tok.decode(part.pop(v)[:-1]))
    assert not any(part.values())
    names = sorted(int(d.split()[1]) for d in docs)
    assert names == list(range(60))


def test_global_batch_must_divide_by_the_layout():
    from train.main import load_config
    from model.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.global_batch_size=6: must divide by the "
                                          r"data-parallel size x train.grad_accum = 1 x 4 = 4"):
        load_config(["experiment=smoke_cpu_text", "data.global_batch_size=6", "train.grad_accum=4"])
    cfg = load_config(["experiment=smoke_cpu_text", "data.global_batch_size=8", "train.grad_accum=4"])
    assert cfg.data.batch_size == 2


def test_vision_fields_come_from_the_model():
    from train.main import load_config
    from model.config import ConfigError

    cfg = load_config(["experiment=smoke_cpu", "model.vision.patch_size=14"])
    assert (cfg.data.patch_size, cfg.data.temporal_patch_size, cfg.data.merge_size) == (14, 2, 2)
    with pytest.raises(ConfigError, match=r"data.merge_size=4 differs from "
                                          r"model.vision.spatial_merge_size=2: leave data.merge_size"):
        load_config(["experiment=smoke_cpu", "data.merge_size=4"])
