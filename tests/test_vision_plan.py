"""The decoupled vision plan (parallel/vision_plan.py) against the unsharded encoder and model.

The multi-process checks run once per world size (2 and 3 gloo ranks, every rank with the same
weights and batch) in one spawn each; every check reports per rank, and each test below asserts
its own check, so a failure names what broke.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import traceback

import pytest
import torch

from parallel.vision_plan import (PLANS, VisionPlanStats, apply_vision_plan, assign_items,
                                  find_vision_encoder, reduce_vision_grads)

# (h, w) images and one (frames, h, w) video: a big image, small ones, mixed sizes.
IMAGES = [(128, 128), (32, 32), (64, 96), (32, 32)]
VIDEO = (4, 64, 64)


def test_assign_items_puts_the_big_image_alone():
    assert assign_items([1000, 10, 10, 10, 10], 2) == [[0], [1, 2, 3, 4]]
    assert assign_items([10, 10, 1000, 10, 10], 3) == [[2], [0, 3], [1, 4]]
    # Deterministic: equal sizes go to ranks in item order; the same input gives the same answer.
    assert assign_items([4, 4, 4, 4], 2) == [[0, 2], [1, 3]] == assign_items([4, 4, 4, 4], 2)


def test_assign_items_fewer_items_than_ranks_and_none():
    assert assign_items([7], 3) == [[0], [], []]
    assert assign_items([], 2) == [[], []]


def test_patch_imbalance():
    assert VisionPlanStats(patches_per_rank=[64, 64]).patch_imbalance == 1.0
    assert VisionPlanStats(patches_per_rank=[64, 32, 32]).patch_imbalance == 1.5
    assert VisionPlanStats(patches_per_rank=[0, 0]).patch_imbalance == 1.0


def test_unknown_plan_name_is_rejected():
    with pytest.raises(ValueError, match=r"parallel.vision.name='sharded' is not one of"):
        apply_vision_plan(torch.nn.Linear(1, 1), None, "sharded")


def test_no_process_group_or_no_encoder_is_a_no_op():
    from model.config import load_model_config
    from model.vision import VisionEncoder

    cfg = load_model_config("tiny_vl")
    enc = VisionEncoder(cfg.vision, cfg.hidden_size)
    for name in PLANS:
        assert apply_vision_plan(enc, None, name) is None and type(enc) is VisionEncoder
    assert apply_vision_plan(torch.nn.Linear(1, 1), None) is None


# ---------------------------------------------------------------- multi-process checks (workers)

def _batch_items(double: bool):
    """pixel_values [N, 1536] and grid_thw [M, 3]: the images, then the video, then a last image."""
    from tests.vision_fixtures import random_image, random_video

    items = [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGES[:3])]
    items.append(random_video(*VIDEO, seed=9))
    items.append(random_image(*IMAGES[3], seed=3))
    px = torch.cat([v.pixel_values for v in items])
    return (px.double() if double else px), torch.tensor([v.grid_thw for v in items])


def _encoder(cfg, dtype):
    from model.vision import VisionEncoder

    torch.manual_seed(0)
    enc = VisionEncoder(cfg.vision, cfg.hidden_size).to(dtype)
    with torch.no_grad():  # well away from the 0.02 init, so that every term matters
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return enc


def _loss(out):
    """A fixed projection of the merged tokens: the same on every rank."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (out * w.to(out.dtype)).sum()


def _assert_grads_equal(ref, test, tol):
    ref_grads = dict(ref.named_parameters())
    for name, p in test.named_parameters():
        g, r = p.grad, ref_grads[name].grad
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def check_encoder_fp64(rank, world, group, cfg):
    px, grid = _batch_items(double=True)
    ref = _encoder(cfg, torch.float64)
    enc = copy.deepcopy(ref)
    keys = list(enc.state_dict())
    plan = apply_vision_plan(enc, group)
    assert plan is not None and plan.world == world and list(enc.state_dict()) == keys
    assert type(enc).__name__ == "BalancedVisionEncoder"
    expect = ref(px, grid)
    out = enc(px, grid)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    _loss(expect).backward()
    _loss(out).backward()
    reduce_vision_grads(enc)
    _assert_grads_equal(ref, enc, 1e-11)
    # The balance and the bytes of the last call, as every rank computes them.
    patches = [t * h * w for t, h, w in grid.tolist()]
    assert patches == [64, 4, 24, 32, 4]
    assert plan.stats.patches_per_rank == {2: [64, 64], 3: [64, 32, 32]}[world]
    rows = [sum(patches[i] for i in s) // 4 for s in assign_items(patches, world)]
    assert plan.stats.allgather_bytes == world * max(rows) * cfg.hidden_size * 8
    n_params = sum(p.numel() for p in enc.parameters())
    assert plan.stats.grad_allreduce_bytes_total == n_params * 8


def check_encoder_fp32(rank, world, group, cfg):
    px, grid = _batch_items(double=False)
    ref = _encoder(cfg, torch.float32)
    enc = copy.deepcopy(ref)
    apply_vision_plan(enc, group)
    with torch.no_grad():
        torch.testing.assert_close(enc(px, grid), ref(px, grid), rtol=1e-6, atol=1e-6)


def check_fewer_items_than_ranks(rank, world, group, cfg):
    px, grid = _batch_items(double=True)
    n = int(grid[0].prod())
    px, grid = px[:n], grid[:1]  # one image: every rank but one encodes nothing
    ref = _encoder(cfg, torch.float64)
    enc = copy.deepcopy(ref)
    plan = apply_vision_plan(enc, group)
    out = enc(px, grid)
    expect = ref(px, grid)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    _loss(out).backward()
    _loss(expect).backward()
    assert plan.stats.items_per_rank == [1] + [0] * (world - 1)
    # Before the reduction: the idle ranks hold zero gradients on every parameter, not None.
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        if rank != 0:
            assert not p.grad.any(), name
    reduce_vision_grads(enc)
    _assert_grads_equal(ref, enc, 1e-11)


def check_no_items(rank, world, group, cfg):
    px, _ = _batch_items(double=True)
    enc = _encoder(cfg, torch.float64)
    plan = apply_vision_plan(enc, group)
    out = enc(px[:0], torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, cfg.hidden_size) and out.dtype == torch.float64
    assert plan.stats.allgather_bytes == 0  # no collective: every rank knows there is nothing
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def check_replicated_is_a_no_op(rank, world, group, cfg):
    from model.vision import VisionEncoder

    px, grid = _batch_items(double=True)
    ref = _encoder(cfg, torch.float64)
    enc = copy.deepcopy(ref)
    assert apply_vision_plan(enc, group, "replicated") is None
    assert type(enc) is VisionEncoder and not hasattr(enc, "vision_plan")
    _loss(enc(px, grid)).backward()
    _loss(ref(px, grid)).backward()
    assert reduce_vision_grads(enc, group) == 0  # nothing to reduce: the grads are already whole
    _assert_grads_equal(ref, enc, 0.0)


def check_fsdp_reduces_instead(rank, world, group, cfg):
    """Option (b) of reduce_vision_grads: FSDP2 shards the ViT over the group itself, with a
    divide factor of the data-parallel size (1 here), so its reduce-scatter is the sum. Also with
    one item only: the idle ranks' zero term must drive FSDP's backward hooks like a real one."""
    from torch.distributed.fsdp import fully_shard

    px, grid = _batch_items(double=True)
    n = int(grid[0].prod())
    for pixels, grids in ((px, grid), (px[:n], grid[:1])):
        ref = _encoder(cfg, torch.float64)
        enc = copy.deepcopy(ref)
        apply_vision_plan(enc, group)
        fully_shard(enc)
        enc.set_gradient_divide_factor(1.0)
        torch.testing.assert_close(enc(pixels, grids), ref(pixels, grids), rtol=1e-12, atol=1e-12)
        _loss(enc(pixels, grids)).backward()
        _loss(ref(pixels, grids)).backward()
        for (name, p), r in zip(enc.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), r.grad, rtol=1e-11, atol=1e-11,
                                       msg=lambda m, name=name: f"{name}: {m}")


def check_language_model(rank, world, group, cfg):
    """The whole tiny VL model (images of several sizes, a video, text): loss and every gradient
    equal the unsharded model's. The plan is given the group as a 1-D DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    from model.language_model import Qwen35LM
    from tests.test_vision_model import mixed_docs
    from tests.vision_fixtures import ToyTokenizer, model_inputs, pack

    torch.manual_seed(0)
    ref = Qwen35LM(cfg).double()
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    plan = apply_vision_plan(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
    assert plan is not None and list(model.state_dict()) == keys
    batch = pack(mixed_docs(ToyTokenizer()), seq_len=96)
    inputs = {k: v.double() if k.startswith("pixel") else v for k, v in model_inputs(batch).items()}
    out, expect = model(**inputs), ref(**inputs)
    torch.testing.assert_close(out.loss, expect.loss, rtol=1e-12, atol=1e-12)
    out.loss.backward()
    expect.loss.backward()
    reduce_vision_grads(model)
    _assert_grads_equal(ref, model, 1e-10)
    assert sum(plan.stats.items_per_rank) == 4 and plan.stats.calls == 1
    assert find_vision_encoder(model) is model.visual


CHECKS = [check_encoder_fp64, check_encoder_fp32, check_fewer_items_than_ranks, check_no_items,
          check_replicated_is_a_no_op, check_fsdp_reduces_instead, check_language_model]
# 3 ranks: the uneven splits (3 ranks on 2 cores costs; the rest is covered by 2 ranks).
CHECKS_3 = [check_encoder_fp64, check_fewer_items_than_ranks, check_no_items]


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    from model.config import load_model_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    cfg = load_model_config("tiny_vl")
    results = {}
    for check in CHECKS if world == 2 else CHECKS_3:
        try:
            check(rank, world, dist.group.WORLD, cfg)
            results[check.__name__] = "ok"
        except Exception:  # noqa: BLE001 - any failure is reported by the test that owns the check
            results[check.__name__] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _run(world: int, tmp) -> list[dict]:
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp / "store"), str(tmp)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    missing = [r for r in range(world) if not (tmp / f"rank{r}.json").exists()]
    assert not missing, f"ranks {missing} died (exit codes {[p.exitcode for p in procs]})"
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def spawn_once(tmp_path_factory):
    """world -> per-rank results; one spawn per world size, shared by its tests."""
    return functools.cache(lambda world: _run(world, tmp_path_factory.mktemp(f"vision_plan_{world}")))


@pytest.mark.parametrize("world,check", [(2, c.__name__) for c in CHECKS]
                         + [(3, c.__name__) for c in CHECKS_3])
def test_multiprocess(world, check, spawn_once):
    results = spawn_once(world)
    failures = {r: res[check] for r, res in enumerate(results) if res[check] != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{tb}" for r, tb in failures.items())
