"""Each parallel layout against one process on the same global batch: the model built on the meta
device, sharded and materialised rank by rank has one process's initial weights bit for bit; then
three optimizer steps of the tiny multimodal model (with an MTP block), in float64, compare every
micro-batch loss and every gradient (gathered to full tensors) with a single-process run that
accumulates the same micro-batches."""

from __future__ import annotations

import pytest
import torch

from model.config import load_model_config
from parallel.config import ParallelConfig
from parallel.grads import clip_grad_norm_, match_grad_placements
from parallel.materialize import materialize
from parallel.mesh import build_meshes, validate_layout
from parallel.plan import parallelize
from parallel.vision_plan import reduce_vision_grads
from tests.distributed import run_ranks
from tests.meta_build import SEED, full, initial_state_mismatches, meta_model, reference_model
from tests.vision_fixtures import ToyTokenizer, caption_batch, model_inputs

STEPS = 3
CLIP = 1.0


def grad_mismatches(named_params, ref_params: dict) -> list[str]:
    """Parameters whose gathered gradient is not the reference's (rtol 1e-8), with the largest
    difference and the norm ratio; a gradient present on one side only fails at once."""
    bad = []
    for name, p in named_params:
        r = ref_params[name]  # a pipeline stage's parameter names are the full model's
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is not None and not torch.allclose(full(p.grad), r.grad, rtol=1e-8, atol=1e-11):
            g = full(p.grad)
            bad.append(f"{name}: {float((g - r.grad).abs().max()):.3g} ratio "
                       f"{float(g.norm() / r.grad.norm()):.6f}")
    return bad


def check_layout(rank: int, world: int, sizes: dict, vision: str, ac: str) -> None:
    cfg = load_model_config("tiny_vl")
    cfg.mtp_num_layers = 1
    if sizes.get("tp", 1) == 4:  # 4 GDN heads to shard; the 2 KV heads are replicated
        cfg.linear_num_key_heads = cfg.linear_num_value_heads = 4
    ref = reference_model(cfg)
    model = meta_model(cfg)
    pcfg = ParallelConfig(**sizes, activation_checkpoint=ac)
    pcfg.vision.name = vision
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=64), "cpu")
    parallelize(model, meshes, pcfg, torch.device("cpu"))
    materialize(model, "cpu", SEED)  # this rank's shards only
    assert not initial_state_mismatches(model, ref), "step 0 weights differ from one process's"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    tok = ToyTokenizer()
    dp = meshes.dp_size
    for step in range(STEPS):
        batches = [caption_batch(tok, step * dp + r, rows=2, seq_len=64) for r in range(dp)]
        total = sum(b["num_tokens"] for b in batches)
        ref_losses = []
        ref_opt.zero_grad()
        for b in batches:
            out = ref(**{k: v.double() if v.is_floating_point() else v for k, v in model_inputs(b).items()})
            (out.loss * b["num_tokens"] / total).backward()
            ref_losses.append(out.loss.item())
        ref_norm = clip_grad_norm_(list(ref.parameters()), CLIP)

        mine = batches[meshes.dp_rank]
        opt.zero_grad()
        out = model(**{k: v.double() if v.is_floating_point() else v for k, v in model_inputs(mine).items()})
        (out.loss * mine["num_tokens"] / total).backward()  # FSDP sums over the dp ranks
        reduce_vision_grads(model)  # the balanced plan's ViT grads are partial over the tp ranks
        match_grad_placements(model.parameters())
        norm = clip_grad_norm_(list(model.parameters()), CLIP)
        assert abs(float(out.loss) - ref_losses[meshes.dp_rank]) < 1e-10, (step, float(out.loss), ref_losses)
        bad = grad_mismatches(model.named_parameters(), dict(ref.named_parameters()))
        assert not bad, f"step {step} rank {rank}: " + ", ".join(bad)
        assert abs(float(norm) - float(ref_norm)) < 1e-6 * float(ref_norm), (float(norm), float(ref_norm))
        opt.step()
        ref_opt.step()


@pytest.mark.parametrize("world,sizes,vision,ac", [
    (2, {"dp_shard": 2}, "balanced", "none"),                      # FSDP2
    (2, {"dp_shard": 2}, "balanced", "full"),
    (2, {"tp": 2}, "replicated", "none"),                          # TP + SP
    (2, {"tp": 2}, "balanced", "full"),                            # + the vision plan over tp
    (2, {"dp_shard": 2, "ep": 2}, "balanced", "none"),             # EP (+ FSDP of the rest)
    (4, {"dp_shard": 2, "tp": 2}, "balanced", "selective"),
    (4, {"dp_shard": 2, "tp": 2, "ep": 2}, "balanced", "none"),
    (4, {"tp": 4}, "balanced", "none"),                            # more tp ranks than KV heads
], ids=["dp2", "dp2-ac", "tp2", "tp2-vision-ac", "ep2", "dp2xtp2", "tp2xep2", "tp4-kv-replicated"])
def test_layout_matches_one_process(world, sizes, vision, ac):
    run_ranks(world, check_layout, sizes, vision, ac)
