"""Context parallelism against one process, in float64: the Gated DeltaNet state passing alone, then
three AdamW steps of whole models (losses within 1e-10, gathered gradients within 1e-8 of each
tensor's largest element) under cp=2, cp=4 and cp composed with tp, ep and pp (GPipe, and 1F1B /
interleaved 1F1B with 4 micro-batches). Documents of lengths 1, 63, 64, 65, one spanning every
rank, documents ending exactly on a slice boundary; the multimodal model with an image and a video
whose visual tokens straddle the slice boundaries; an MTP block, whose shifted targets cross them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from model.config import load_model_config
from model.context_parallel import CPSlice, gated_delta_cp, local_cu_seqlens, slice_range
from model.ops.gated_delta import chunk_gated_delta_rule
from parallel.config import ParallelConfig
from parallel.context_parallel import GroupComm
from parallel.grads import clip_grad_norm_
from parallel.materialize import materialize
from parallel.mesh import build_meshes, validate_layout
from parallel.plan import parallelize
from tests.distributed import run_ranks
from tests.meta_build import SEED, full, initial_state_mismatches, meta_model, reference_model
from tests.vision_fixtures import ToyTokenizer, model_inputs, pack, random_image, random_video

STEPS = 3
TEXT_DOCS = [[1, 63, 64, 65, 63], [256], [30, 200, 26]]   # per step, one row of 256 tokens


def text_batch(step: int, vocab: int, seed: int | None = None) -> dict:
    g = torch.Generator().manual_seed(step if seed is None else seed)
    docs = [SimpleNamespace(input_ids=torch.randint(16, vocab, (n - 1,), generator=g).tolist(),
                            images=[], videos=[]) for n in TEXT_DOCS[step % len(TEXT_DOCS)]]
    return model_inputs(pack(docs, 256))


def step_batches(step: int, cfg, microbatches: int) -> list[dict]:
    """The step's micro-batches: the step's own batch, then text batches of the other layouts."""
    first = vision_batch(step) if cfg.vision is not None else text_batch(step, cfg.vocab_size)
    return [first] + [text_batch(step + i, cfg.vocab_size, seed=100 * i + step)
                      for i in range(1, microbatches)]


def vision_batch(step: int) -> dict:
    """One row of 128: documents of 1 and 46 tokens, then an image document whose 4 visual tokens
    sit at 62..65 (across the cp=2 boundary at 64) and a video document whose first frame's tokens
    sit at 94..97 (across the cp=4 boundary at 96)."""
    from model.vision_tokens import expand_document

    tok = ToyTokenizer()
    g = torch.Generator().manual_seed(step)
    text = SimpleNamespace(input_ids=torch.randint(16, 200, (45,), generator=g).tolist(), images=[], videos=[])
    empty = SimpleNamespace(input_ids=[], images=[], videos=[])
    image = expand_document([" look at this ", random_image(64, 64, step), " a red thing"], tok)
    video = expand_document([random_video(4, 64, 64, step), " moving"], tok)
    batch = model_inputs(pack([empty, text, image, video], 128))
    ids = batch["input_ids"][0]
    assert ids[62:66].tolist() == [4] * 4 and ids[94:98].tolist() == [5] * 4, ids.tolist()
    return batch


def grad_mismatches(named_params, ref_params: dict) -> list[str]:
    """Parameters whose gathered gradient differs from the reference's by more than 1e-8 of the
    reference's largest element. Elementwise rtol fails on elements near zero: the slices sum the
    same terms in another order (~1e-16 relative), and AdamW's m / sqrt(v) magnifies what that
    does to near-zero gradients into the next steps' weights (differences ~5e-11 at step 2)."""
    bad = []
    for name, p in named_params:
        r = ref_params[name]
        assert (p.grad is None) == (r.grad is None), name
        if r.grad is None:
            continue
        diff = float((full(p.grad) - r.grad).abs().max())
        if diff > 1e-8 * float(r.grad.abs().max()) + 1e-13:
            bad.append(f"{name}: {diff:.3g} of max {float(r.grad.abs().max()):.3g}")
    return bad


def as_double(batch: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


NAMES = ("loss", "ce", "mtp_ce", "moe_aux")


def check_cp_layout(rank: int, world: int, sizes: dict, model_name: str, microbatches: int = 1) -> None:
    """STEPS AdamW steps of `microbatches` micro-batches each (more than one: through the pipeline
    schedule only) against one process accumulating the same micro-batches, token-weighted."""
    cfg = load_model_config(model_name)
    cfg.mtp_num_layers = 1
    ref = reference_model(cfg)
    model = meta_model(cfg)
    pcfg = ParallelConfig(**sizes)
    seq_len = 128 if cfg.vision is not None else 256
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=seq_len), "cpu")
    assert microbatches == 1 or meshes.pp is not None
    runner = parallelize(model, meshes, pcfg, torch.device("cpu"), num_microbatches=microbatches)
    model = runner.model
    materialize(model, "cpu", SEED)
    assert not initial_state_mismatches(model, ref), "step 0 weights differ from one process's"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for step in range(STEPS):
        batches = [{**as_double(b), "num_tokens": int((b["labels"] != -100).sum())}
                   for b in step_batches(step, cfg, microbatches)]
        total = sum(b["num_tokens"] for b in batches)
        ref_opt.zero_grad()
        want = dict.fromkeys(NAMES, 0.0)
        for b in batches:
            ref_out = ref(**{k: v for k, v in b.items() if k != "num_tokens"})
            (ref_out.loss * (b["num_tokens"] / total)).backward()
            for name in NAMES:
                want[name] += b["num_tokens"] / total * float(getattr(ref_out, name))
        ref_norm = clip_grad_norm_(list(ref.parameters()), 1.0)

        opt.zero_grad()
        if meshes.pp is None:  # the model's own outputs, in float64
            out = model(**{k: v for k, v in batches[0].items() if k != "num_tokens"})
            out.loss.backward()
            got = {name: float(getattr(out, name)) for name in NAMES}
            tol = 1e-10
        else:  # through the pipeline schedule, whose logged sums are Python floats of fp32
            got, _ = runner.step(batches, total)
            tol = 1e-6
        params = [p for p in model.parameters() if p.grad is not None]
        runner.finish_grads(params)
        norm = clip_grad_norm_(params, 1.0, norm=runner.grad_norm(params))
        for name in NAMES:
            assert abs(got[name] - want[name]) < tol * max(1.0, abs(want[name])), (step, name, got, want)
        bad = grad_mismatches(model.named_parameters(), dict(ref.named_parameters()))
        assert not bad, f"step {step} rank {rank}: " + ", ".join(bad)
        assert abs(float(norm) - float(ref_norm)) < 1e-6 * float(ref_norm)
        opt.step()
        ref_opt.step()


@pytest.mark.parametrize("world,sizes,model_name", [
    (2, {"cp": 2}, "tiny"),
    (4, {"cp": 4}, "tiny"),
    (2, {"cp": 2}, "tiny_vl"),
    (4, {"cp": 4}, "tiny_vl"),
    (4, {"cp": 2, "tp": 2}, "tiny_vl"),     # + the balanced vision plan over tp
    (2, {"cp": 2, "ep": 2}, "tiny"),
    (4, {"cp": 2, "pp": 2, "pp_schedule": "gpipe"}, "tiny"),
], ids=["cp2", "cp4", "cp2-vision", "cp4-vision", "cp2xtp2-vision", "cp2xep2", "cp2xpp2"])
def test_cp_matches_one_process(world, sizes, model_name):
    run_ranks(world, check_cp_layout, sizes, model_name, timeout_s=300)


@pytest.mark.parametrize("schedule,virtual", [("1f1b", 1), ("interleaved_1f1b", 2)])
def test_cp_through_pipeline_schedules_with_micro_batches(schedule, virtual):
    """cp2 x pp2 with 4 micro-batches in flight (1F1B's steady state, interleaved stages): each
    micro-batch's slices travel the pipeline apart and the step still equals one process."""
    sizes = {"cp": 2, "pp": 2, "pp_schedule": schedule, "pp_virtual_stages": virtual}
    run_ranks(4, check_cp_layout, sizes, "tiny", 4, timeout_s=300)


def check_state_passing(rank: int, world: int) -> None:
    """gated_delta_cp on each rank's slice == the chunked kernel over the whole stream (outputs
    and the gradients of q, k, v, g, beta, gathered), documents crossing every boundary."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(0)
    n, hk, h, kd, vd = 192, 1, 2, 8, 8
    # 65 tokens across the first cp=4 boundary, 119 across the cp=2 one (three cp=4 slices)
    cu = torch.tensor([0, 5, 70, 71, 192 - 2, 192])
    q, k = (torch.randn(1, n, hk, kd, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, n, h, vd, generator=g, dtype=torch.float64)
    gate = -torch.rand(1, n, h, generator=g, dtype=torch.float64)
    beta = torch.rand(1, n, h, generator=g, dtype=torch.float64)
    w = torch.randn(1, n, h, vd, generator=g, dtype=torch.float64)
    inputs = [x.requires_grad_(True) for x in (q, k, v, gate, beta)]
    ref, _ = chunk_gated_delta_rule(*inputs, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    ref_grads = torch.autograd.grad((ref * w).sum(), inputs)

    comm = GroupComm(dist.group.WORLD)
    start, end = slice_range(n, rank, world)
    local = [x.detach()[:, start:end].clone().requires_grad_(True) for x in inputs]
    cp = CPSlice(comm=comm, start=start, end=end, total=n, cu_seqlens=cu)
    starts = cu[:-1]
    continues = not bool((starts == start).any())
    o = gated_delta_cp(chunk_gated_delta_rule, *local, local_cu_seqlens(cu, start, end), continues, cp)
    torch.testing.assert_close(o, ref[:, start:end].detach(), rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((o * w[:, start:end]).sum(), local)
    for mine, whole in zip(grads, ref_grads):
        torch.testing.assert_close(mine, whole[:, start:end], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("world", [2, 4])
def test_gdn_state_passing_matches_whole_sequence(world):
    run_ranks(world, check_state_passing)

