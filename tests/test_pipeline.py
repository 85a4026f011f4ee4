"""Pipeline parallelism against one process: three AdamW steps (fp64) of the tiny model through a
pp=2 pipeline must give the micro-batch losses, the gathered gradients and the gradient norm of
one process accumulating the same micro-batches with the same token weights. Plus the start-up
rules of `parallel.pp*` and the split of the layers into stages."""

from __future__ import annotations

import copy

import pytest
import torch

from data.packing import random_batch
from model.config import ConfigError, load_model_config
from parallel.config import ParallelConfig
from parallel.grads import clip_grad_norm_, match_grad_placements
from parallel.materialize import materialize
from parallel.layout import stage_layer_counts, validate_layout
from parallel.mesh import build_meshes
from parallel.pipeline import build_pipeline, stage_ids
from parallel.pipeline_stage import stage_layer_ranges
from parallel.vision_plan import reduce_vision_grads
from tests.distributed import run_ranks
from tests.meta_build import SEED, initial_state_mismatches, meta_model, reference_model
from tests.test_parallel_plans import grad_mismatches

STEPS = 3
CLIP = 1.0
SEQ = 32


def text_batch(seed: int, rows: int = 2, seq_len: int = SEQ, vocab: int = 1024) -> dict:
    """Rows packed with random documents of 4-19 tokens (data.packing.random_batch)."""
    return random_batch(seed, rows, seq_len, vocab)


def make_batch(vision: bool, seed: int) -> dict:
    if not vision:
        return text_batch(seed)
    from tests.vision_fixtures import ToyTokenizer, caption_batch

    return caption_batch(ToyTokenizer(), seed, rows=2, seq_len=64)


def model_inputs(b: dict) -> dict:
    keys = ("input_ids", "position_ids", "cu_seqlens", "labels", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw")
    return {k: (b[k].double() if b[k].is_floating_point() else b[k]) for k in keys if k in b}


def check_pipeline(rank: int, world: int, model_name: str, mtp: int, sizes: dict) -> None:
    cfg = load_model_config(model_name)
    cfg.mtp_num_layers = mtp
    vision = cfg.vision is not None
    ref = reference_model(cfg)
    model = meta_model(cfg)
    pcfg = ParallelConfig(**sizes)
    m = pcfg.pp_microbatches
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=64), "cpu")
    runner = build_pipeline(model, meshes, pcfg, torch.device("cpu"), m)
    del model
    materialize(runner.model, "cpu", SEED)  # this rank's stages only
    assert not initial_state_mismatches(runner.model, ref), "step 0 weights differ from one process's"
    opt = torch.optim.AdamW(runner.model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    ref_params = dict(ref.named_parameters())
    dp = meshes.dp_size
    for step in range(STEPS):
        # m micro-batches per data-parallel rank; weights share the global batch's loss tokens.
        batches = [[make_batch(vision, 100 * step + 10 * r + i) for i in range(m)] for r in range(dp)]
        total = sum(b["num_tokens"] for mbs in batches for b in mbs)
        ref_opt.zero_grad()
        ref_losses = []
        for mbs in batches:
            ref_losses.append([])
            for b in mbs:
                out = ref(**model_inputs(b))
                (out.loss * b["num_tokens"] / total).backward()
                ref_losses[-1].append(out.loss.item())
        ref_norm = clip_grad_norm_(list(ref.parameters()), CLIP)

        mine = batches[meshes.dp_rank]
        opt.zero_grad()
        sums, modality = runner.step([{**b, **model_inputs(b)} for b in mine], total)
        expected = sum(b["num_tokens"] / total * loss for b, loss in zip(mine, ref_losses[meshes.dp_rank]))
        assert abs(sums["loss"] - expected) < 1e-10, (step, sums["loss"], expected)
        assert set(sums) >= {"loss", "ce"} | ({"moe_aux", "moe_z"} if cfg.mlp_type == "moe" else set())
        assert bool(modality) == vision
        for s in runner.stages:  # the last stage's record of each micro-batch
            for rec, loss in zip(s.records, ref_losses[meshes.dp_rank]):
                assert abs(float(rec["loss"]) - loss) < 1e-10, (step, float(rec["loss"]), loss)
        params = [p for p in runner.model.parameters() if p.grad is not None]
        match_grad_placements(params)
        reduce_vision_grads(runner.model)
        norm = clip_grad_norm_(params, CLIP, norm=runner.grad_norm(params))
        names = {name for name, _ in runner.model.named_parameters()}
        bad = grad_mismatches(runner.model.named_parameters(), ref_params)
        assert not bad, f"step {step} rank {rank}: " + ", ".join(bad)
        assert abs(float(norm) - float(ref_norm)) < 1e-6 * float(ref_norm), (float(norm), float(ref_norm))
        opt.step()
        ref_opt.step()
    load = runner.collect_expert_load()
    assert load is None or load.shape == (runner._num_routers, cfg.num_experts)
    # Every parameter of the model lives on exactly one pp rank.
    counts = torch.tensor([len(names)])
    torch.distributed.all_reduce(counts, group=meshes.pp.get_group())
    assert int(counts) == len(ref_params), (int(counts), len(ref_params))


def pp2(schedule: str = "1f1b", virtual: int = 1, m: int = 4, **more) -> dict:
    return {"pp": 2, "pp_schedule": schedule, "pp_virtual_stages": virtual, "pp_microbatches": m, **more}


@pytest.mark.parametrize("world,model_name,mtp,sizes", [
    (2, "tiny", 0, pp2("1f1b")),
    (2, "tiny", 0, pp2("interleaved_1f1b", virtual=2, activation_checkpoint="selective")),
    (2, "tiny", 0, pp2("gpipe", m=3)),
    # vision tower on the first stage, MTP on the last, an uneven split, a 3-layer last stage
    (2, "tiny_vl", 1, pp2("1f1b", m=2, pp_layers_per_stage=[1, 3])),
    # zero bubble: the weight backward deferred into the bubbles
    (2, "tiny", 0, pp2("zbv", virtual=2)),
    (2, "tiny_vl", 1, pp2("interleaved_zb", virtual=2, m=2)),
], ids=["pp2-1f1b", "pp2-interleaved-ac", "pp2-gpipe", "pp2-vision-mtp-uneven", "pp2-zbv",
        "pp2-interleaved-zb-vision-mtp"])
def test_pipeline_matches_one_process(world, model_name, mtp, sizes):
    run_ranks(world, check_pipeline, model_name, mtp, sizes)


@pytest.mark.parametrize("world,model_name,mtp,sizes", [
    (4, "tiny", 0, pp2("1f1b", dp_shard=2)),
    (4, "tiny", 0, pp2("1f1b", tp=2)),
    (4, "tiny", 0, pp2("interleaved_1f1b", virtual=2, dp_shard=2, ep=2)),
    (4, "tiny_vl", 1, pp2("1f1b", m=2, tp=2)),  # + the balanced vision plan over tp, MTP
], ids=["pp2xdp2", "pp2xtp2", "pp2xep2-interleaved", "pp2xtp2-vision-mtp"])
def test_pipeline_composes_on_four_ranks(world, model_name, mtp, sizes):
    run_ranks(world, check_pipeline, model_name, mtp, sizes, timeout_s=300)


# ---- start-up rules and the split (no processes) ------------------------------------------------

TINY = load_model_config("tiny")


def rule(world=2, model=TINY, **parallel):
    return validate_layout(ParallelConfig(**parallel), model, world, 64)


@pytest.mark.parametrize("kwargs,message", [
    (dict(pp=2, pp_schedule="chimera"), "parallel.pp_schedule='chimera': must be one of 'gpipe', '1f1b'"),
    (dict(pp=2, pp_virtual_stages=2), "parallel.pp_virtual_stages=2: parallel.pp_schedule='1f1b' runs "
                                      "one stage per rank"),
    (dict(pp=2, pp_schedule="interleaved_1f1b"), "parallel.pp_virtual_stages=1: "
                                                 "parallel.pp_schedule='interleaved_1f1b' interleaves"),
    (dict(pp=2, pp_schedule="zbv", pp_virtual_stages=3), "runs exactly 2 stages per rank"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=4),
     "model.num_layers=4: must be divisible by parallel.pp * pp_virtual_stages = 2*4 = 8 stages"),
    (dict(pp=2, pp_layers_per_stage=[1, 2, 1]), "parallel.pp_layers_per_stage=[1, 2, 1]: needs one "
                                                "entry per stage"),
    (dict(pp=2, pp_layers_per_stage=[1, 2]), "sums to 3, must equal model.num_layers=4"),
    (dict(pp=4, world=4, pp_layers_per_stage=[2, 0, 1, 1]), "a middle stage needs >= 1 layer"),
    (dict(pp=2, pp_microbatches=1), "parallel.pp_microbatches=1: parallel.pp_schedule='1f1b' needs at "
                                    "least parallel.pp=2 micro-batches"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2, pp_microbatches=5),
     "parallel.pp_microbatches=5: parallel.pp_schedule='interleaved_1f1b' needs a multiple of"),
    (dict(pp=2, pp_microbatches=0), "parallel.pp_microbatches=0: must be >= 1"),
    (dict(world=4, pp=2, pp_schedule="zbv", pp_virtual_stages=2),
     "parallel.pp_schedule='zbv': zero-bubble schedules do not compose with FSDP or tensor parallelism "
     "(data-parallel size 2; dp_shard=-1 resolved to 2 from WORLD_SIZE=4, parallel.tp=1)"),
    (dict(world=4, pp=2, cp=2, pp_schedule="zbv", pp_virtual_stages=2),
     "parallel.pp_schedule='zbv': zero-bubble schedules do not compose with context parallelism "
     "(parallel.cp=2"),
])
def test_pipeline_rules_name_field_value_and_rule(kwargs, message):
    with pytest.raises(ConfigError) as e:
        rule(**kwargs)
    assert "\n" not in str(e.value)
    assert message in str(e.value), str(e.value)


def test_pipeline_rules_against_grad_accum_and_tied_embeddings():
    with pytest.raises(ConfigError, match="parallel.pp_microbatches=4 and train.grad_accum=2"):
        validate_layout(ParallelConfig(pp=2, pp_microbatches=4), TINY, 2, 64, grad_accum=2)
    with pytest.raises(ConfigError, match=r"train.grad_accum=1: parallel.pp_schedule='1f1b' needs"):
        validate_layout(ParallelConfig(pp=2), TINY, 2, 64, grad_accum=1)
    tied = copy.deepcopy(TINY)
    tied.tie_word_embeddings = True
    with pytest.raises(ConfigError, match="tie_word_embeddings=true is not supported under pipeline"):
        rule(pp=2, model=tied)
    assert rule(pp=2, pp_schedule="gpipe", pp_microbatches=1).pp == 2
    assert rule(pp=2, pp_schedule="zbv", pp_virtual_stages=2).dp_shard == 1
    with pytest.raises(ConfigError, match="parallel.tp=2\\); use 1f1b or interleaved_1f1b"):
        rule(world=4, pp=2, tp=2, pp_schedule="interleaved_zb", pp_virtual_stages=2)


def test_stage_split_and_placement():
    even = ParallelConfig(pp=2, pp_virtual_stages=2, pp_schedule="interleaved_1f1b")
    assert stage_layer_ranges(stage_layer_counts(even, 8)) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    uneven = ParallelConfig(pp=3, pp_layers_per_stage=[1, 4, 2])
    assert stage_layer_ranges(stage_layer_counts(uneven, 7)) == [(0, 1), (1, 5), (5, 7)]
    assert stage_ids(1, 2, 2, "interleaved_1f1b") == [1, 3]     # loop: rank r, r + pp, ...
    assert stage_ids(0, 2, 2, "zbv") == [0, 3]                  # V: rank r, 2pp - 1 - r
    assert stage_ids(1, 4, 1, "1f1b") == [1]
