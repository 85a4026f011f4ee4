"""FP8 precision policy and its emulated backend on CPU: the per-layer table, BF16 layers left
bit-identical, quantisation error within the formats' bounds, the FP8 GEMMs' gradients, an
emulated-FP8 training run against the BF16 one, exact resume with delayed-scaling state, the
Transformer Engine backend's refusal without TE / CUDA, and activation checkpointing that changes
no bit. The parallel runs are in test_fp8_parallel.py."""

import contextlib
import copy
import json

import pytest
import torch

from model.config import ConfigError, load_model_config
from model.language_model import Qwen35LM
from train.fp8_config import PrecisionConfig
from train.fp8_emulated import (GRAD, INPUT, WEIGHT, EmulatedFp8GroupedExperts, EmulatedFp8Linear,
                                Quantiser, _Fp8GroupedFn, fp8_autocast, pad_groups)
from train.fp8_policy import apply_precision, precision_table
from train.fp8_quant import (E4M3, E5M2, per_tensor_scale, pow2_block_scale_inv, quantise_blocks_1d,
                             quantise_blocks_2d, quantise_scaled, relative_error_bound)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two spinning OpenMP
    threads per process made the training runs here 20x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_config(overrides):
    from train.main import load_config  # imported on use: the spawned ranks below skip it

    return load_config(overrides)
EMULATED = PrecisionConfig(backend="emulated")


def table(model, p):
    return {r.name: r for r in precision_table(model, p)}


# ---- the policy ---------------------------------------------------------------------------------

def test_default_policy_keeps_sensitive_layers_in_bf16():
    rows = table(Qwen35LM(load_model_config("tiny_vl")), EMULATED)
    fp8 = {n for n, r in rows.items() if r.precision == "fp8"}
    for name in ("embed_tokens", "lm_head", "layers.1.mlp.gate", "layers.1.mlp.shared_expert_gate",
                 "layers.1.linear_attn.in_proj_a", "layers.1.linear_attn.in_proj_b",
                 "visual.patch_embed.proj", "visual.merger.linear_fc1", "visual.merger.linear_fc2"):
        assert rows[name].precision == "bf16", name
    assert not any(n.startswith(("layers.0.", "layers.3.")) for n in fp8)  # first and last layer
    assert "first 1 decoder layer" in rows["layers.0.linear_attn.out_proj"].reason
    assert "last 1 decoder layer" in rows["layers.3.self_attn.q_proj"].reason
    assert not any("conv" in n for n in fp8)
    for layer in (1, 2):
        for sub in ("linear_attn.out_proj", "linear_attn.in_proj_z", "mlp.experts",
                    "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                    "mlp.shared_expert.down_proj"):
            assert f"layers.{layer}.{sub}" in fp8
    # The DeltaNet q/k/v projections, fused or split, run FP8 in the middle layers.
    assert any(n.startswith("layers.1.linear_attn.in_proj_") and n[-1] in "qkv" for n in fp8)
    assert {"visual.blocks.0.attn.qkv", "visual.blocks.1.mlp.linear_fc2"} <= fp8
    assert all(r.precision == "bf16" for r in precision_table(Qwen35LM(load_model_config("tiny")),
                                                              PrecisionConfig()))


def test_custom_patterns_and_depth():
    model = Qwen35LM(load_model_config("tiny"))
    p = PrecisionConfig(backend="emulated", include=["layers.*.mlp.*"],
                        extra_exclude=["*.shared_expert.*"], keep_first_n=0, keep_last_n=0)
    fp8 = {n for n, r in table(model, p).items() if r.precision == "fp8"}
    assert fp8 == {f"layers.{i}.mlp.experts" for i in range(4)}
    p = PrecisionConfig(backend="emulated", grouped_experts=False, keep_first_n=2, keep_last_n=0)
    rows = table(model, p)
    assert rows["layers.2.mlp.experts"].reason == "precision.grouped_experts=false"
    assert rows["layers.1.mlp.shared_expert.up_proj"].precision == "bf16"
    assert rows["layers.3.self_attn.o_proj"].precision == "fp8"


def test_policy_cli_prints_the_table(capsys):
    from train.fp8_policy import main

    assert main(["model=tiny", "precision=fp8_emulated", "precision.recipe=mxfp8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("precision: backend=emulated recipe=mxfp8 format=hybrid: 18 of ")
    assert "layers.1.mlp.experts" in out and "exclude 'lm_head'" in out


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="precision.recipe='fp4'"):
        load_config(["precision=fp8_emulated", "precision.recipe=fp4"])
    with pytest.raises(ConfigError, match="precision.keep_first_n"):
        load_config(["model=tiny", "precision=fp8_emulated", "precision.keep_first_n=3",
                     "precision.keep_last_n=2"])
    assert load_config(["precision=fp8_emulated"]).precision.backend == "emulated"


def test_te_backend_without_te_or_cuda_stops_clearly():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the refusal is for machines without one")
    with pytest.raises(ConfigError, match="precision.backend='te'.*train.device='cpu'"):
        load_config(["precision=fp8_te", "train.device=cpu"])
    # The one-GPU smoke experiment composes with it; here it stops at the missing GPU.
    with pytest.raises(ConfigError, match="precision.backend='te': no CUDA device"):
        load_config(["experiment=smoke_1gpu", "precision=fp8_te"])
    with pytest.raises(RuntimeError, match="precision.backend='te'"):
        apply_precision(Qwen35LM(load_model_config("tiny")), PrecisionConfig(backend="te"), CPU)


# ---- the formats' error bounds --------------------------------------------------------------------

def wide_range(*shape, seed=0):
    """Magnitudes spread over 2**-24 .. 2**8 (wider than e4m3's normal range, about e5m2's), both
    signs, a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp2(torch.rand(*shape, generator=g) * 32 - 24) * torch.randn(*shape, generator=g).sign()
    x.view(-1)[::97] = 0.0
    return x


def check_bounds(x, q, scaled_abs, fmt):
    """Normal values: relative error <= half an ulp; subnormals: absolute error <= half the
    subnormal step (2**-9 for e4m3, 2**-16 for e5m2), in the scaled domain."""
    normal = scaled_abs >= fmt.min_normal
    rel = ((q - x).abs() / x.abs())[normal]
    assert normal.float().mean() > 0.3 and (~normal & (x != 0)).any()
    assert rel.max() <= relative_error_bound(fmt) * (1 + 1e-6), (fmt.name, rel.max())
    step = fmt.min_normal * 2.0 ** -fmt.mantissa_bits
    scaled_err = (q - x).abs() * (scaled_abs / x.abs().clamp(min=1e-30))
    assert scaled_err[~normal & (x != 0)].max() <= step / 2 * (1 + 1e-5)
    assert (q[x == 0] == 0).all()
    return rel.max().item()


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_per_tensor_error_within_format_bounds(fmt):
    x = wide_range(64, 256)
    scale = per_tensor_scale(x.abs().amax(), fmt)
    q = quantise_scaled(x, scale, fmt)
    worst = check_bounds(x, q, (x * scale).abs(), fmt)
    assert worst > relative_error_bound(fmt) / 4  # the bound is tight, not vacuous
    assert q.abs().max() <= x.abs().max()
    # Delayed scaling with a stale, too-large scale saturates at the format's max instead of inf.
    assert quantise_scaled(torch.tensor([1e9]), torch.tensor(1.0), fmt).item() == fmt.max


@pytest.mark.parametrize("block,dim", [(32, -1), (32, -2), (128, -1)])
@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_block_scaled_error_within_format_bounds(fmt, block, dim):
    x = wide_range(96, 256, seed=1)
    q = quantise_blocks_1d(x, fmt, block, dim)
    xb = x.movedim(dim, -1).unflatten(-1, (-1, block))
    scale_inv = pow2_block_scale_inv(xb.abs().amax(-1, keepdim=True), fmt)
    assert torch.equal(scale_inv, torch.exp2(torch.log2(scale_inv)))  # powers of two (E8M0)
    scaled = (xb / scale_inv).flatten(-2).movedim(-1, dim).abs()
    check_bounds(x, q, scaled, fmt)
    # Every dequantised value is an fp8 value times its block's power-of-two scale.
    qs = (q.movedim(dim, -1).unflatten(-1, (-1, block)) / scale_inv)
    assert torch.equal(qs, qs.to(fmt.dtype).float())


def test_blockwise_weight_tiles_within_bounds():
    w = wide_range(2, 256, 384, seed=2)
    q = quantise_blocks_2d(w, E4M3, 128)
    tiles = w.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128))
    scale_inv = pow2_block_scale_inv(tiles.abs().amax(dim=(-3, -1), keepdim=True), E4M3)
    scaled = (tiles / scale_inv).flatten(-2).flatten(-3, -2).abs()
    check_bounds(w, q, scaled, E4M3)
    # A ragged shape is padded with zeros, which change no tile's scale.
    torch.testing.assert_close(quantise_blocks_2d(w[:, :200, :300], E4M3), q[:, :200, :300], rtol=0, atol=0)


# ---- the emulated GEMMs ----------------------------------------------------------------------------

def test_linear_gemms_multiply_fp8_operands_e5m2_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    ref = copy.deepcopy(lin)
    apply = PrecisionConfig(backend="emulated", recipe="tensorwise")
    lin.__class__ = EmulatedFp8Linear
    lin.setup_fp8(apply)
    x = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, 48)
    torch.testing.assert_close(lin(x), ref(x), rtol=0, atol=0)  # outside fp8_autocast: plain
    with fp8_autocast():
        y = lin(x)
    y.backward(g)

    def q(t, fmt):
        return quantise_scaled(t, per_tensor_scale(t.abs().amax(), fmt), fmt)

    x2, g2 = x.detach().reshape(-1, 64), g.reshape(-1, 48)
    torch.testing.assert_close(y.detach().reshape(-1, 48), q(x2, E4M3) @ q(lin.weight.detach(), E4M3).T
                               + lin.bias.detach())
    torch.testing.assert_close(x.grad.reshape(-1, 64), q(g2, E5M2) @ q(lin.weight.detach(), E4M3))
    torch.testing.assert_close(lin.weight.grad, q(g2, E5M2).T @ q(x2, E4M3))
    torch.testing.assert_close(lin.bias.grad, g2.sum(0))
    # The error against the exact GEMM is what e4m3 predicts (a few percent), no more.
    assert (y - ref(x)).norm() / ref(x).norm() < 0.05
    assert set(lin.state_dict()) == {"weight", "bias"}  # stateless recipe: no extra keys


def test_pad_groups():
    x = torch.arange(8.0).view(8, 1)
    xp, counts, dest = pad_groups(x, torch.tensor([3, 0, 5]), 4)
    assert counts.tolist() == [4, 0, 8] and xp.shape == (12, 1)
    assert dest.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert xp[:, 0].tolist() == [0, 1, 2, 0, 3, 4, 5, 6, 7, 0, 0, 0]


@pytest.mark.parametrize("recipe", ["tensorwise", "mxfp8"])
def test_grouped_gemm_quantises_per_expert(recipe):
    """The grouped FP8 GEMM equals a loop of per-expert FP8 GEMMs, forward and backward."""
    torch.manual_seed(0)
    e, n, k = 3, 32, 64
    counts = torch.tensor([32, 0, 64])
    x = (torch.randn(96, k) * torch.tensor([1.0] * 32 + [100.0] * 64).unsqueeze(1)).requires_grad_()
    w = torch.randn(e, n, k, requires_grad=True)
    g = torch.randn(96, n)
    rows = torch.repeat_interleave(torch.arange(e), counts)
    qz = Quantiser(recipe, "hybrid")
    y = _Fp8GroupedFn.apply(x, w, counts.cumsum(0).to(torch.int32), rows, qz)
    y.backward(g)
    xs, gs = x.detach().split(counts.tolist()), g.split(counts.tolist())
    for i in (0, 2):
        qi = Quantiser(recipe, "hybrid")
        ref = qi.quantise(xs[i], INPUT) @ qi.quantise(w[i].detach(), WEIGHT).T
        torch.testing.assert_close(y[counts[:i].sum():counts[:i + 1].sum()].detach(), ref)
        dw = qi.quantise(gs[i], GRAD, "col").T @ qi.quantise(xs[i], INPUT, "col")
        torch.testing.assert_close(w.grad[i], dw)
        dx = qi.quantise(gs[i], GRAD) @ qi.quantise(w[i].detach(), WEIGHT, "col")
        torch.testing.assert_close(x.grad[counts[:i].sum():counts[:i + 1].sum()], dx)
    assert w.grad[1].abs().max() == 0  # an expert without tokens gets a zero gradient


# ---- the model ------------------------------------------------------------------------------------

def run_with_hooks(model, context, names, inputs):
    """(loss, {name: (inputs, output)}) of one forward, recorded by hooks on the named modules."""
    def tensors(x):
        x = x if isinstance(x, (tuple, list)) else (x,)
        return [t.detach().clone() for t in x if isinstance(t, torch.Tensor)]

    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, (tensors(i), tensors(o)))) for n in names]
    with context():
        loss = model(**inputs).loss
    for h in hooks:
        h.remove()
    return loss, seen


def model_and_inputs(name):
    torch.manual_seed(0)
    model = Qwen35LM(load_model_config(name))
    if name == "tiny_vl":
        from tests.vision_fixtures import ToyTokenizer, caption_batch, model_inputs

        return model, model_inputs(caption_batch(ToyTokenizer(), 0, rows=2))
    ids = torch.randint(0, 1024, (2, 48))
    return model, {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}


@pytest.mark.parametrize("name,expect_same", [
    ("tiny", {"embed_tokens", "layers.0.linear_attn.in_proj_a", "layers.0.mlp.experts",
              "layers.0.mlp.gate", "layers.0.mlp.shared_expert_gate"}),
    ("tiny_vl", {"embed_tokens", "visual.patch_embed.proj"})])
def test_bf16_layers_are_bit_identical_with_fp8_elsewhere(name, expect_same):
    """A module the policy keeps in BF16 computes exactly as without FP8: given the same input
    it returns the same bits (its input differs where FP8 layers feed it, e.g. a VL model's
    first decoder layer reads the FP8 vision tower's features)."""
    plain, inputs = model_and_inputs(name)
    fp8 = copy.deepcopy(plain)
    ctx = apply_precision(fp8, EMULATED, CPU)[0].autocast
    assert isinstance(fp8.layers[1].mlp.experts, EmulatedFp8GroupedExperts)
    assert isinstance(fp8.layers[1].mlp.shared_expert.down_proj, EmulatedFp8Linear)
    assert type(fp8.lm_head) is torch.nn.Linear
    assert type(fp8.layers[0].mlp.experts).__name__ == "GroupedExperts"
    kept = [r.name for r in precision_table(plain, EMULATED) if r.precision == "bf16"]
    probes = ["layers.0", "layers.1", "layers.1.linear_attn.out_proj"]
    loss_a, a = run_with_hooks(plain, contextlib.nullcontext, kept + probes, inputs)
    loss_b, b = run_with_hooks(fp8, ctx, kept + probes, inputs)
    same_input = {n for n in kept if n in a and all(torch.equal(x, y) for x, y in zip(a[n][0], b[n][0]))}
    assert expect_same <= same_input
    for n in same_input:
        assert all(torch.equal(x, y) for x, y in zip(a[n][1], b[n][1])), n
    if name == "tiny":  # the whole first decoder layer is BF16 and reads only the embedding
        assert torch.equal(a["layers.0"][1][0], b["layers.0"][1][0])
    for n in ("layers.1", "layers.1.linear_attn.out_proj"):  # FP8 ones differ ...
        assert not torch.equal(a[n][1][0], b[n][1][0]), n
    assert abs(loss_a.item() - loss_b.item()) < 0.01 * loss_a.item()  # ... by little
    loss_c, _ = run_with_hooks(fp8, contextlib.nullcontext, [], inputs)  # outside fp8_autocast
    assert torch.equal(loss_a, loss_c)
    # Parameter names and the checkpoint keys of the parameters are unchanged.
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fp8.named_parameters()]
    extra = set(fp8.state_dict()) - set(plain.state_dict())
    assert extra and all(k.endswith(("fp8_amax_history", "fp8_scale")) for k in extra)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_every_recipe_trains(recipe, bf16):
    """Also under bf16 autocast with fp32 weights, the GPU trainer's setting (the grouped
    weight-gradient once met a bf16 gradient and an fp32 saved input there)."""
    torch.manual_seed(0)
    model = Qwen35LM(load_model_config("tiny"))
    fp8, _ = apply_precision(model, PrecisionConfig(backend="emulated", recipe=recipe), CPU)
    ids = torch.randint(0, 1024, (2, 32))
    with fp8.autocast(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = model(ids, labels=torch.roll(ids, -1, 1))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.layers[1].mlp.experts.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


# ---- training runs ----------------------------------------------------------------------------------

RUN = ["model=tiny", "data.seq_len=128", "data.batch_size=4", "train.device=cpu",
       "train.autocast=none", "train.warmup_steps=5", "train.peak_flops=1e12",
       "logging.wandb=disabled", "checkpoint.save_final=false"]


def losses(run_dir, *overrides):
    from train.trainer import Trainer

    history = Trainer(load_config(RUN + [f"run_dir={run_dir}", *overrides]), run_dir).fit()
    return [r["loss"] for r in history]


def test_emulated_fp8_loss_tracks_bf16(tmp_path):
    steps = ["train.max_steps=30", "checkpoint.interval=0"]
    bf16 = losses(tmp_path / "bf16", *steps)
    fp8 = losses(tmp_path / "fp8", *steps, "precision=fp8_emulated")
    assert bf16[-1] < bf16[0] - 1.5 and fp8[-1] < fp8[0] - 1.5  # both learn
    gap = max(abs(a - b) / a for a, b in zip(bf16, fp8))
    print(f"bf16 {bf16[0]:.4f} -> {bf16[-1]:.4f}, fp8 {fp8[0]:.4f} -> {fp8[-1]:.4f}, "
          f"max relative gap {gap:.4f}")
    assert gap < 0.02
    assert bf16 != fp8


def test_delayed_scaling_state_resumes_exactly(tmp_path):
    """6 steps in one go log what 3 steps + resume + 3 steps log: the amax histories and scales
    are in the checkpoint. A short history makes it roll over within the run."""
    from train import checkpoint as ckpt
    from train.trainer import Trainer

    fp8 = ["precision=fp8_emulated", "precision.amax_history_len=2", "train.lr_decay_steps=6"]
    full = losses(tmp_path / "full", *fp8, "train.max_steps=6", "checkpoint.interval=0")
    split = tmp_path / "split"
    losses(split, *fp8, "train.max_steps=3", "checkpoint.interval=3")
    path = ckpt.latest_checkpoint(split / "checkpoints")
    t = Trainer(load_config(RUN + [f"run_dir={split}", *fp8, "train.max_steps=6",
                                   "checkpoint.interval=0"]), split)
    scale = t.model.layers[1].mlp.experts.fp8_scale
    assert (scale == 1).all()
    t.restore()
    assert t.step == 3 and not (scale == 1).all()  # the FP8 state came back from the checkpoint
    assert path.name == "step_00000003"
    t.fit()
    resumed = [json.loads(line)["loss"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert resumed == full
    # The HF export of a checkpoint with FP8 state takes the weights and leaves the FP8 state.
    from train.checkpoint.hf_convert import export_checkpoint

    out = export_checkpoint(path, tmp_path / "hf", model=load_model_config("tiny"))
    assert (out / "config.json").exists()


# ---- activation checkpointing ------------------------------------------------------------------

def fp8_buffers(model):
    """{name: delayed-scaling history or scale}, as full tensors."""
    from torch.distributed.tensor import DTensor

    return {n: b.full_tensor() if isinstance(b, DTensor) else b
            for n, b in model.named_buffers() if n.endswith(("fp8_amax_history", "fp8_scale"))}


def test_activation_checkpoint_recomputes_with_the_forwards_scales():
    """Full activation checkpointing changes nothing under delayed scaling: the recompute in
    backward reuses each forward's scales (not the since-updated ones) and records no second amax.
    Two micro-batches per step run forward, forward, backward, backward, as a pipeline schedule
    does: the second forward updates the scales before the first one's recompute."""
    from parallel.activation_checkpoint import apply_activation_checkpoint
    from tests.test_pipeline import model_inputs, text_batch

    torch.manual_seed(0)
    ref = Qwen35LM(load_model_config("tiny")).double()
    model = copy.deepcopy(ref)
    ref_fp8, _ = apply_precision(ref, EMULATED, CPU)
    fp8, _ = apply_precision(model, EMULATED, CPU)
    assert apply_activation_checkpoint(model.layers, "full", context_fn=fp8.checkpoint_contexts) == 4
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    for step in range(3):
        batches = [model_inputs(text_batch(10 * step + i)) for i in range(2)]
        results = []
        for m, hooks, opt in zip((ref, model), (ref_fp8, fp8), opts):
            opt.zero_grad()
            with hooks.autocast():
                losses = [m(**b).loss for b in batches]
            for loss in losses:
                loss.backward()
            results.append(([x.item() for x in losses], {n: p.grad.clone() for n, p in m.named_parameters()},
                            fp8_buffers(m)))
            opt.step()
        (ref_losses, ref_grads, ref_state), (losses, grads, state) = results
        assert losses == ref_losses, step
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items()), step
        assert all(torch.equal(state[n], b) for n, b in ref_state.items()), step
        history = state["layers.1.mlp.shared_expert.up_proj.fp8_amax_history"]
        assert int((history[:, :2] != 0).any(-1).any(-1).sum()) == 2 * (step + 1)  # one row per forward


def test_trainer_activation_checkpoint_with_fp8_changes_nothing(tmp_path):
    """One process applies parallel.activation_checkpoint too, with the FP8 checkpoint contexts:
    the run logs the losses and grad norms of the run without it, bit for bit."""
    from train.trainer import Trainer

    runs = []
    for ac in ("none", "full"):
        cfg = load_config(RUN + [f"run_dir={tmp_path / ac}", "precision=fp8_emulated", "train.max_steps=2",
                                 "train.grad_accum=2", "data.seq_len=64", "checkpoint.interval=0",
                                 f"parallel.activation_checkpoint={ac}"])
        trainer = Trainer(cfg, tmp_path / ac)
        assert (trainer.model.layers[0].forward.__name__ == "checkpointed") == (ac == "full")
        runs.append([(r["loss"], r["grad_norm"]) for r in trainer.fit()])
    assert runs[0] == runs[1]
