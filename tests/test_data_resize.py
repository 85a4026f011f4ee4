"""The same training trajectory in every data-parallel layout and across a resize, with real gloo
ranks: a tiny model trained in fp64 (token-weighted loss, gradients summed over the ranks, as
train/trainer.py does it) logs the same losses, to fp64 rounding, on 1, 2 or 4 ranks with any
gradient accumulation and worker count, and when a run of one layout is resumed in another."""

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

from data.config import DataConfig
from data.loader import build_loader
from model.config import load_model_config
from model.language_model import Qwen35LM
from tests.distributed import run_ranks

G, V, LR = 8, 8, 0.05  # global batch rows, virtual streams, SGD learning rate
VISUAL = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def data_config(kind: str, spec: str, dp: int, accum: int, workers: int) -> DataConfig:
    if kind == "text":
        base = dict(name="synthetic_text", seq_len=64)
    else:
        base = dict(name="webdataset", shards=spec, seq_len=128, image_min_pixels=1024,
                    video_min_pixels=1024, shuffle_buffer=4)
    return DataConfig(**base, seed=5, virtual_streams=V, batch_size=G // (dp * accum),
                      num_workers=workers)


def model(kind: str) -> Qwen35LM:
    cfg = load_model_config("tiny" if kind == "text" else "tiny_vl")
    cfg = dataclasses.replace(cfg, router_aux_loss_coef=0.0)  # per micro-batch: not layout-free
    torch.manual_seed(0)  # the same initial weights on every rank
    return Qwen35LM(cfg).double()


def _train(rank: int, world: int, kind: str, spec: str, accum: int, workers: int, steps: int,
           resume: str, out: str) -> None:
    """`steps` optimizer steps on `world` ranks from `resume` (a file this function wrote, or "");
    rank 0 writes the losses and the state (weights, every rank's loader state) to `out`."""
    torch.set_default_dtype(torch.float64)
    loader = build_loader(data_config(kind, spec, world, accum, workers), rank, world)
    net = model(kind)
    if resume:
        saved = torch.load(resume, weights_only=False)
        net.load_state_dict(saved["model"])
        loader.load_state_dict(saved["data"])  # every old rank's state: any old layout
    losses = []
    for _ in range(steps):
        batches = [next(loader) for _ in range(accum)]
        total = torch.tensor(float(sum(b["num_tokens"] for b in batches)))
        dist.all_reduce(total)
        net.zero_grad()
        loss = torch.zeros(())
        for b in batches:
            out_ = net(b["input_ids"], position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"],
                       labels=b["labels"], **{k: b[k] for k in VISUAL if k in b})
            part = out_.ce * (b["num_tokens"] / total)
            part.backward()
            loss += part.detach()
        dist.all_reduce(loss)
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p -= LR * p.grad
        losses.append(loss.item())
    states = [None] * world
    dist.all_gather_object(states, loader.state_dict())
    loader.close()
    if rank == 0:
        torch.save({"model": net.state_dict(), "data": states}, out + ".pt")
        with open(out, "w") as f:
            json.dump(losses, f)


def train(tmp_path, name, world, kind, spec, steps, accum=1, workers=0, resume=""):
    out = str(tmp_path / name)
    run_ranks(world, _train, kind, spec, accum, workers, steps, resume and resume + ".pt", out,
              timeout_s=300)
    with open(out) as f:
        return json.load(f), out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, mm_shards):
    """kind -> the losses of 4 steps in one process accumulating 2 micro-batches (computed once)."""
    cache = {}

    def losses(kind):
        if kind not in cache:
            cache[kind] = train(tmp_path_factory.mktemp("one"), "one", 1, kind, mm_shards, 4,
                                accum=2)[0]
        return cache[kind]

    return losses


@pytest.mark.parametrize("kind", ["text", "mm"])
def test_layouts_train_the_same_losses_in_fp64(tmp_path, kind, mm_shards, one_process):
    """2 ranks with 2 workers each and 4 ranks in-process log what one process logs."""
    want = one_process(kind)
    assert len(set(want)) == 4
    for name, world, workers in (("dp2", 2, 2), ("dp4", 4, 0)):
        got, _ = train(tmp_path, name, world, kind, mm_shards, 4, workers=workers)
        assert got == pytest.approx(want, rel=1e-12, abs=0), name


@pytest.mark.parametrize("old,new", [((2, 0), (4, 2)), ((4, 1), (2, 0)), ((2, 2), (1, 0))],
                         ids=["2to4", "4to2", "2to1"])
def test_resize_continues_the_trajectory_in_fp64(tmp_path, old, new, mm_shards, one_process):
    """(ranks, workers) for 2 steps, a checkpoint, then another (ranks, workers) for 2 more: the
    losses of the uninterrupted single process."""
    first, ckpt = train(tmp_path, "first", old[0], "mm", mm_shards, 2, workers=old[1])
    then, _ = train(tmp_path, "then", new[0], "mm", mm_shards, 2, workers=new[1], resume=ckpt)
    assert first + then == pytest.approx(one_process("mm"), rel=1e-12, abs=0)
