"""Emulated FP8 under parallelism: scales agree across ranks through the amax group, which leaves
out other pipeline stages; tensor-, data-, pipeline- and expert-parallel FP8 runs equal one process
(fp64); a rank without images keeps the vision tower's FP8 state in step with the others."""

import copy

import pytest
import torch

from model.config import load_model_config
from model.language_model import Qwen35LM
from parallel.config import ParallelConfig
from parallel.distributed import sum_over
from parallel.grads import clip_grad_norm_, match_grad_placements
from parallel.mesh import build_meshes, validate_layout
from tests.test_fp8 import CPU, EMULATED, fp8_buffers
from train.fp8_config import PrecisionConfig
from train.fp8_emulated import INPUT, fp8_autocast
from train.fp8_policy import apply_precision
from train.fp8_quant import E4M3


def _amax_group_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from train.fp8_emulated import swap_to_emulated

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same weights on every rank
    lin = torch.nn.Linear(32, 16)
    swap_to_emulated(lin, PrecisionConfig(backend="emulated"), group=dist.group.WORLD)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(rank)) * (rank + 1)  # own data
    with fp8_autocast():
        lin(x).sum().backward()
    torch.save({"scale": lin.fp8_scale, "amax": x.abs().amax()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_delayed_scales_agree_across_ranks_with_an_amax_group(tmp_path):
    """With the data-parallel group as amax reduction group, every rank derives the same scales
    (from the largest amax of any rank), so the replicas' FP8 GEMMs stay identical."""
    import torch.multiprocessing as mp

    mp.spawn(_amax_group_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.testing.assert_close(r0["scale"], r1["scale"], rtol=0, atol=0)
    amax = max(r0["amax"], r1["amax"])
    assert r0["scale"][INPUT].item() == pytest.approx(E4M3.max / amax.item(), rel=1e-6)


def _fp8_layout_worker(rank, world, sizes, recipe):
    """Three AdamW steps (fp64) of the tiny model with emulated FP8 under the layout `sizes`,
    against one process: losses, gathered gradients, grad norm and the delayed-scaling state.
    Data parallelism max-reduces the amaxes over the dp ranks, so its reference runs the global
    batch as one micro-batch; a pipeline's reference accumulates the micro-batches in order."""
    from parallel.pipeline import build_pipeline
    from parallel.plan import parallelize
    from tests.test_parallel_plans import full
    from tests.test_pipeline import model_inputs, text_batch
    from train.fp8_policy import fp8_amax_group

    cfg = load_model_config("tiny")
    cfg.router_aux_loss_coef = 0.0  # a statistic of the batch: the dp ranks' shares don't add up to it
    torch.manual_seed(0)
    ref = Qwen35LM(cfg).double()
    model = copy.deepcopy(ref)
    p = PrecisionConfig(backend="emulated", recipe=recipe)
    ref_fp8, _ = apply_precision(ref, p, CPU)
    pcfg = ParallelConfig(**sizes)
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=32), "cpu")
    fp8, _ = apply_precision(model, p, CPU, fp8_amax_group(meshes))
    m = pcfg.pp_microbatches if pcfg.pp > 1 else 1
    runner = None
    if pcfg.pp > 1:
        runner = build_pipeline(model, meshes, pcfg, CPU, m, fp8.checkpoint_contexts)
        runner.set_forward_context(fp8.autocast)
        model = runner.model
    else:
        parallelize(model, meshes, pcfg, CPU, fp8.checkpoint_contexts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    dp = meshes.dp_size
    for step in range(3):
        batches = [[text_batch(100 * step + 10 * r + i) for i in range(m)] for r in range(dp)]
        total = sum(b["num_tokens"] for mbs in batches for b in mbs)
        ref_opt.zero_grad()
        ref_loss = 0.0
        for i in range(m):  # micro-batch i of every dp rank as one batch
            b = _concat_batches([mbs[i] for mbs in batches])
            with ref_fp8.autocast():
                out = ref(**model_inputs(b))
            (out.loss * b["num_tokens"] / total).backward()
            ref_loss += float(out.loss) * b["num_tokens"] / total
        ref_norm = clip_grad_norm_(list(ref.parameters()), 1.0)

        mine = batches[meshes.dp_rank]
        opt.zero_grad()
        if runner is not None:
            loss = runner.step([{**b, **model_inputs(b)} for b in mine], total)[0]["loss"]
        else:
            with fp8.autocast():
                out = model(**model_inputs(mine[0]))
            (out.loss * mine[0]["num_tokens"] / total).backward()
            loss = float(out.loss) * mine[0]["num_tokens"] / total
        loss = sum_over([loss], meshes.loss)[0]
        params = [q for q in model.parameters() if q.grad is not None]
        match_grad_placements(params)
        norm = clip_grad_norm_(params, 1.0, norm=runner.grad_norm(params) if runner else None)
        assert abs(loss - ref_loss) < 1e-10, (step, loss, ref_loss)
        ref_params = dict(ref.named_parameters())
        bad = [n for n, q in model.named_parameters() if q.grad is not None and not torch.allclose(
            full(q.grad), ref_params[n].grad, rtol=1e-8, atol=1e-11)]
        assert not bad, f"step {step} rank {rank}: {bad}"
        assert abs(float(norm) - float(ref_norm)) < 1e-9 * float(ref_norm), (float(norm), float(ref_norm))
        ref_state = fp8_buffers(ref)
        state = fp8_buffers(model)
        assert bool(state) == (recipe == "delayed")
        assert all(torch.allclose(b, ref_state[n], rtol=1e-12, atol=0) for n, b in state.items()), step
        opt.step()
        ref_opt.step()


def _concat_batches(batches):
    """Rows of several text batches as one (cu_seqlens shifted past the earlier batches' tokens)."""
    if len(batches) == 1:
        return batches[0]
    out = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "labels", "position_ids")}
    cu, offset = [batches[0]["cu_seqlens"][:1]], 0
    for b in batches:
        cu.append(b["cu_seqlens"][1:] + offset)
        offset += int(b["cu_seqlens"][-1])
    return {**out, "cu_seqlens": torch.cat(cu), "num_tokens": sum(b["num_tokens"] for b in batches)}


def _amax_group_ranks_worker(rank, world, sizes, expected):
    import torch.distributed as dist

    from train.fp8_policy import fp8_amax_group

    cfg = load_model_config("tiny")
    meshes = build_meshes(validate_layout(ParallelConfig(**sizes), cfg, world, seq_len=32), "cpu")
    assert dist.get_process_group_ranks(fp8_amax_group(meshes)) == expected[rank]


def test_amax_group_leaves_out_other_pipeline_stages():
    """Under pipeline parallelism the amax all-reduces run over the ranks of one stage: over all
    ranks they paired with another stage's unrelated ones (that hung the run)."""
    from tests.distributed import run_ranks

    run_ranks(4, _amax_group_ranks_worker, {"pp": 2, "tp": 2}, [[0, 1], [0, 1], [2, 3], [2, 3]])


@pytest.mark.parametrize("world,sizes,recipe", [
    (2, {"tp": 2}, "delayed"),
    (2, {"tp": 2, "activation_checkpoint": "full"}, "tensorwise"),
    (2, {"dp_shard": 2}, "delayed"),
    (2, {"pp": 2, "pp_microbatches": 2, "activation_checkpoint": "full"}, "delayed"),
    (2, {"ep": 2}, "delayed"),
    (4, {"tp": 2, "ep": 2}, "tensorwise"),
], ids=["tp2-delayed", "tp2-ac-tensorwise", "dp2-delayed", "pp2-ac-delayed", "ep2-delayed",
        "tp2-ep2-tensorwise"])
def test_emulated_fp8_layout_matches_one_process(world, sizes, recipe):
    """In fp64 a parallel layout's FP8 run equals one process to rounding. (In fp32 a tensor-
    parallel run's grad norm drifts from the single process's by up to percents within a few
    steps: summation-order differences flip the FP8 rounding of elements near a rounding boundary
    and Adam amplifies them; one process with weights moved by one fp32 ulp drifts as much.)"""
    from tests.distributed import run_ranks

    run_ranks(world, _fp8_layout_worker, sizes, recipe)


def _vision_tower_worker(rank, world):
    from tests.test_pipeline import model_inputs, text_batch
    from tests.vision_fixtures import ToyTokenizer, caption_batch

    torch.manual_seed(0)
    model = Qwen35LM(load_model_config("tiny_vl")).double()
    fp8, _ = apply_precision(model, EMULATED, CPU, torch.distributed.group.WORLD)
    batch = caption_batch(ToyTokenizer(), 0, rows=2) if rank == 0 else text_batch(0)
    for _ in range(2):
        with fp8.autocast():
            out = model(**model_inputs(batch))
        out.loss.backward()
    state = torch.cat([b.flatten() for n, b in model.named_buffers() if n.startswith("visual.")
                       and "fp8_" in n])
    assert (model.visual.blocks[0].attn.qkv.fp8_scale != 1).any()  # rank 0's images set them
    states = [torch.empty_like(state) for _ in range(world)]
    torch.distributed.all_gather(states, state)
    assert torch.equal(states[0], states[1])  # one delayed-scaling state for the tower
    grads = [p.grad for p in model.visual.parameters()]
    assert all(g is not None for g in grads) and (rank == 0 or all(not g.any() for g in grads))


def test_vision_tower_fp8_state_is_the_same_on_ranks_without_images():
    """A data-parallel rank whose micro-batch has no image runs the vision tower on zero patches:
    its FP8 layers join the amax all-reduces of the ranks that encode images (a rank that skipped
    them hung the run), and the tower's delayed-scaling state stays one for all ranks."""
    from tests.distributed import run_ranks

    run_ranks(2, _vision_tower_worker, timeout_s=30)
