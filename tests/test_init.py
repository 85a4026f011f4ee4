"""Layout-independent initialisation (model/init.py, parallel/materialize.py): the counter-based
generator's statistics and exactness, then models built on the meta device, sharded by the existing
plans on 2 and 4 gloo ranks, materialised rank by rank and gathered: bit-equal to one process."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from model.config import load_model_config
from model.init import (SLAB, Rule, full_index, init_region, mix64, normal, param_rules,
                        random_bits, stream_key)
from model.language_model import Qwen35LM
from parallel.materialize import materialize, shard_indices
from tests.distributed import run_ranks

SEED = 1234
MASK = (1 << 64) - 1


def _mix_reference(z: int) -> int:
    """SplitMix64's finaliser on Python ints (exact uint64 arithmetic)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_bits_match_uint64_reference_beyond_2_pow_32():
    key = stream_key(7, "layers.0.mlp.experts.gate_up_proj")
    idx = torch.tensor([0, 1, 2, 3, (1 << 32) - 1, 1 << 32, 4_000_000_123, (1 << 40) + 5, (1 << 62) + 9])
    got = random_bits(key, idx).tolist()
    want = [_mix_reference((i * 0x9E3779B97F4A7C15 + key) & MASK) for i in idx.tolist()]
    assert [g & MASK for g in got] == want
    assert mix64(torch.tensor([0])).item() == 0  # the finaliser alone fixes 0; the key moves it


def test_normal_and_uniform_statistics():
    n = 1 << 20
    idx = [torch.arange(n)]
    z = init_region(normal(0.02), SEED, "w", (n,), idx, torch.float32, "cpu")
    assert abs(z.mean().item()) < 4 * 0.02 / math.sqrt(n)
    assert abs(z.std().item() / 0.02 - 1) < 5e-3
    assert abs(((z / 0.02) ** 4).mean().item() - 3) < 0.05  # Gaussian kurtosis, not just the moments
    u = init_region(Rule("uniform", -1.0, 1.0), SEED, "u", (n,), idx, torch.float32, "cpu")
    assert u.min() >= -1 and u.max() < 1 and abs(u.mean().item()) < 4 / math.sqrt(3 * n)
    a = init_region(Rule("log_uniform", 0.01, 16.0), SEED, "A_log", (n,), idx, torch.float32, "cpu").exp()
    assert a.min() >= 0.01 * (1 - 1e-6) and a.max() <= 16 * (1 + 1e-6)
    assert abs(a.mean().item() - 8.005) < 0.05
    # Different names and seeds give independent streams.
    other = init_region(normal(0.02), SEED, "w2", (n,), idx, torch.float32, "cpu")
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 5e-3
    assert not torch.equal(z, init_region(normal(0.02), SEED + 1, "w", (n,), idx, torch.float32, "cpu"))


def test_regions_equal_slices_of_the_full_tensor(monkeypatch):
    shape = (6, 5, 7)
    full = init_region(normal(1.0), SEED, "x", shape, full_index(shape, "cpu"), torch.float32, "cpu")
    rows, cols, last = torch.tensor([5, 0, 3]), torch.tensor([4, 1]), torch.arange(2, 7, 2)
    part = init_region(normal(1.0), SEED, "x", shape, [rows, cols, last], torch.float32, "cpu")
    assert torch.equal(part, full[rows][:, cols][:, :, last])
    # Small slabs (many along dim 0, and rows larger than a slab) give the same bits.
    import model.init as init

    for slab in (7, 3):
        monkeypatch.setattr(init, "SLAB", slab)
        again = init_region(normal(1.0), SEED, "x", shape, full_index(shape, "cpu"), torch.float32, "cpu")
        assert torch.equal(again, full)
    monkeypatch.setattr(init, "SLAB", SLAB)
    # Casting: bf16 values are the fp32 values rounded once.
    bf = init_region(normal(1.0), SEED, "x", shape, full_index(shape, "cpu"), torch.bfloat16, "cpu")
    assert torch.equal(bf, full.bfloat16())


def test_works_on_meta_and_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (4_000_000_000,)  # a 397B expert tensor's element count: no memory, no host sync
    out = init_region(normal(0.02), SEED, "e", shape, [torch.arange(8, device="meta")], torch.bfloat16, "meta")
    assert out.shape == (8,) and out.is_meta
    with FakeTensorMode():
        idx = [torch.arange(3), torch.arange(1 << 12)]
        out = init_region(normal(0.02), SEED, "e", (3, 1 << 12), idx, torch.float32, "cpu")
        assert out.shape == (3, 1 << 12)


def test_shard_indices_follow_dtensor_placements():
    """Our index arithmetic against DTensor's own splitter, with uneven and empty pieces."""
    for n in (1, 5, 8, 13):
        x = torch.arange(n)
        for k in (2, 3, 4):
            for p in (Shard(0), _StridedShard(0, split_factor=2), _StridedShard(0, split_factor=3)):
                pieces, _ = p._split_tensor(x, k, with_padding=False, contiguous=True)
                pieces += [x[:0]] * (k - len(pieces))
                for c in range(k):
                    assert torch.equal(shard_indices(x, p, k, c), pieces[c]), (n, k, p, c)


def test_init_weights_is_a_function_of_the_seed(tiny_cfg):
    a = Qwen35LM(tiny_cfg)
    a.init_weights(SEED)
    with torch.device("meta"):
        b = Qwen35LM(tiny_cfg)
    materialize(b, "cpu", SEED)  # the one-process path of the parallel test below
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(3)
    c = Qwen35LM(tiny_cfg)
    torch.manual_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(c.parameters(), Qwen35LM(tiny_cfg).parameters()))
    assert set(param_rules(a)) == {n for n, _ in a.named_parameters()}


def _reference(cfg) -> Qwen35LM:
    ref = Qwen35LM(cfg)
    ref.init_weights(SEED)
    return ref


def check_materialized_layout(rank: int, world: int, sizes: dict, name: str, tied: bool) -> None:
    from parallel.config import ParallelConfig
    from parallel.mesh import build_meshes, validate_layout
    from parallel.plan import parallelize

    cfg = load_model_config(name)
    cfg.tie_word_embeddings = tied
    if sizes.get("tp", 1) == 4:  # 4 GDN heads to shard; the 2 KV heads are replicated
        cfg.linear_num_key_heads = cfg.linear_num_value_heads = 4
    pcfg = ParallelConfig(**sizes)
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=64), "cpu")
    with torch.device("meta"):
        model = Qwen35LM(cfg)
    parallelize(model, meshes, pcfg, torch.device("cpu"))
    materialize(model, "cpu", SEED)
    ref = _reference(cfg)
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(ref_params), set(names) ^ set(ref_params)
    sharded = 0
    for n, p in model.named_parameters():
        if isinstance(p, DTensor):
            sharded += any(not isinstance(pl, Replicate) for pl in p.placements)
            p = p.full_tensor()
        assert torch.equal(p, ref_params[n]), f"rank {rank}: {n}"
    assert sharded > 0
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    for n, b in ref.named_buffers():
        mine = model.get_buffer(n)
        assert torch.equal(mine.full_tensor() if isinstance(mine, DTensor) else mine, b), n
    # The materialised model computes what the reference computes.
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    out, want = model(ids, labels=labels), ref(ids, labels=labels)
    assert torch.allclose(out.loss, want.loss, rtol=1e-5), (float(out.loss), float(want.loss))


@pytest.mark.parametrize("world,sizes,name,tied", [
    (2, {"dp_shard": 2}, "tiny_vl", False),               # FSDP2 (an empty shard: [1, 64] over 2)
    (2, {"tp": 2}, "tiny_vl", False),                     # TP + SP, LocalCompute, vision plan
    (2, {"tp": 2}, "tiny", True),                         # tied embedding re-tied after to_empty
    (2, {"dp_shard": 2, "ep": 2}, "tiny", False),         # EP (+ FSDP of the rest)
    (4, {"dp_shard": 4}, "tiny", True),                   # uneven FSDP2 shards, padding, tied
    (4, {"dp_shard": 2, "tp": 2}, "tiny_vl", False),      # FSDP2 over TP: _StridedShard
    (4, {"dp_shard": 2, "tp": 2, "ep": 2}, "tiny", False),  # TP x EP
    (4, {"tp": 4}, "tiny", False),                        # more tp ranks than KV heads
], ids=["dp2", "tp2", "tp2-tied", "ep2", "dp4-tied", "dp2xtp2", "tp2xep2", "tp4-kv-replicated"])
def test_materialized_layout_matches_one_process(world, sizes, name, tied):
    run_ranks(world, check_materialized_layout, sizes, name, tied)


def check_materialized_pipeline(rank: int, world: int, sizes: dict) -> None:
    from parallel.config import ParallelConfig
    from parallel.mesh import build_meshes, validate_layout
    from parallel.pipeline import parallelize_pipeline

    cfg = load_model_config("tiny_vl")
    cfg.mtp_num_layers = 1
    pcfg = ParallelConfig(**sizes)
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=64), "cpu")
    with torch.device("meta"):
        model = Qwen35LM(cfg)
    stages = parallelize_pipeline(model, meshes, pcfg, torch.device("cpu"))
    ref_params = dict(_reference(cfg).named_parameters())
    for stage in stages:
        materialize(stage, "cpu", SEED)
        names = [n for n, _ in stage.named_parameters()]
        assert names and not any(p.is_meta for p in stage.parameters())
        for n, p in stage.named_parameters():
            p = p.full_tensor() if isinstance(p, DTensor) else p
            assert torch.equal(p, ref_params[n]), f"rank {rank} stage {stage.stage_index}: {n}"
        assert torch.equal(stage.rotary.inv_freq, model.rotary._inv_freq())


@pytest.mark.parametrize("world,sizes", [
    (2, {"pp": 2}),
    (4, {"pp": 2, "dp_shard": 2}),
    (4, {"pp": 2, "tp": 2}),
], ids=["pp2", "pp2xdp2", "pp2xtp2"])
def test_materialized_pipeline_stages_match_one_process(world, sizes):
    run_ranks(world, check_materialized_pipeline, sizes)


def test_global_indices_beyond_2_pow_32_address_the_same_elements():
    rows, cols = 1 << 20, 1 << 13  # 2^33 elements
    part = init_region(normal(1.0), SEED, "big", (rows, cols), [torch.tensor([rows - 1]), torch.arange(5)],
                       torch.float32, "cpu")
    flat = torch.arange(5) + (rows - 1) * cols
    assert torch.equal(part[0], init_region(normal(1.0), SEED, "big", (rows * cols,), [flat], torch.float32, "cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_values():
    idx = torch.cat([torch.arange(1 << 16), torch.arange(5) + (1 << 33)])
    key = stream_key(SEED, "w")
    assert torch.equal(random_bits(key, idx.cuda()).cpu(), random_bits(key, idx))
    for rule in (normal(0.02), Rule("log_uniform", 0.01, 16.0)):
        cpu = init_region(rule, SEED, "w", (1 << 34,), [idx], torch.float32, "cpu")
        gpu = init_region(rule, SEED, "w", (1 << 34,), [idx], torch.float32, "cuda")
        assert (gpu.cpu() != cpu).sum() <= 2  # fp64 transcendentals rounded to fp32: ties only
