"""The one-GPU check: on one H200 it runs in about 8 minutes with start-up; it installs nothing
and reads nothing from the network. Prints one table and writes it as JSON (--out).

    python benchmarks/gpu_check.py --out gpu_check.json              # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --out x.json  # the CPU-runnable parts (CI)

Every row says `ok`, `failed: <one line>` or `skipped: <why>`: a missing package or device, an
exception or the time limit costs that row only.

1. kernel: flash-linear-attention's chunk_gated_delta_rule against the project's PyTorch chunked
   kernel (model/ops/gated_delta.py) at the 35B-A3B shapes (16 q/k heads, 32 v heads of 128),
   T = 8192 packed documents, bf16: forward and gradient max errors (relative to the largest
   reference value) and fwd+bwd ms (fla's own figure on an H200: ~1.9 ms per layer).
2. attention: the attention backends (model.attn_backend) against SDPA with a dense document mask,
   at 4k and 32k packed tokens: max error and fwd+bwd ms.
3. moe: the MoE block (grouped_mm) at 256 experts top-8 + shared expert, hidden 2048, 4096 tokens,
   bf16: fwd+bwd ms and TFLOP/s (Megatron-Bridge's count).
4. train: the full-width 35B-A3B proxy (configs/model/qwen35_35b_a3b_proxy.yaml), seq 4096, the
   micro-batch the memory estimate (parallel/memory.py) fits in 85% of the GPU, BF16 with and
   without activation checkpointing and with 8 micro-batches per optimizer step (as a cluster run
   amortises AdamW), then precision=fp8_emulated (numerics only: its loss against BF16's at the
   same steps) and
   precision=fp8_te when Transformer Engine is importable: step ms, tokens/s, model TFLOP/s
   (model/params.py, Megatron-Bridge's count, against its recipe's 185.6 per H100), peak memory.
   --profile adds the torch profiler's top kernels of two BF16 steps.
5. smoke: `python -m train.main experiment=smoke_1gpu` for a few steps, BF16 and fp8_te.
Everything stops at --total-s (default 480 s): a run ends early, a part not started is skipped.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.util import find_spec
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F

from common import machine_line, markdown_table

ROOT = Path(__file__).resolve().parents[1]

PROXY = "qwen35_35b_a3b_proxy"
PROXY_RUN = [f"model={PROXY}", "data.seq_len=4096", "train.device=cuda", "train.autocast=bf16",
             "train.lr=3e-4", "train.warmup_steps=10", "logging.wandb=disabled", "train.resume=never"]
MEGATRON_TFLOPS = 185.6  # Megatron-Bridge's Qwen3.5-35B-A3B text recipe, 16x H100, BF16, seq 4096
TINY_RUN = ["model=tiny", "data.seq_len=128", "data.batch_size=4", "train.device=cpu",
            "train.autocast=none", "train.warmup_steps=2", "train.peak_flops=1e12",
            "logging.wandb=disabled", "train.resume=never"]


def row(part: str, name: str, status: str, **values) -> dict:
    return {"part": part, "name": name, "status": status, **values}


def guarded(part: str, name: str, fn) -> list[dict]:
    try:
        return fn()
    except Exception as e:  # one broken part must not hide the others
        traceback.print_exc()
        first = (str(e).splitlines() or [""])[0][:160]
        return [row(part, name, f"failed: {type(e).__name__}: {first}")]


# ---- 1. kernels -----------------------------------------------------------------------------------

def kernel_inputs(device, tiny: bool, seed: int = 0):
    """Packed documents (B = 1, cu_seqlens), fla layouts, realistic ranges, bf16 leaves."""
    t, hk, hv, d = (256, 2, 4, 32) if tiny else (8192, 16, 32, 128)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, hk, d, generator=g)
    k = torch.randn(1, t, hk, d, generator=g)
    v = torch.randn(1, t, hv, d, generator=g)
    gate = -F.softplus(torch.randn(1, t, hv, generator=g) - 2.0)
    beta = torch.rand(1, t, hv, generator=g)
    cu = torch.tensor([0, t // 8, t // 2, t - 100, t])
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v, gate, beta)]
    return leaves, cu.to(device)


def fwd_bwd(backend: str, leaves, cu):
    from model.ops.gated_delta import chunk_gated_delta_rule

    for x in leaves:
        x.grad = None
    q, k, v, gate, beta = leaves
    o, _ = chunk_gated_delta_rule(q, k, v, gate, beta, cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
                                  backend=backend)
    o.float().square().mean().backward()
    return o.detach().float(), [x.grad.detach().float() for x in leaves]


def forward_only(backend: str, leaves, cu) -> torch.Tensor:
    """The kernel's output alone (no graph): o [1, T, H, V] as fp32."""
    from model.ops.gated_delta import chunk_gated_delta_rule

    q, k, v, gate, beta = leaves
    o, _ = chunk_gated_delta_rule(q, k, v, gate, beta, cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
                                  backend=backend)
    return o.float()


def timed(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_kernels(device, tiny: bool) -> list[dict]:
    from model.ops.gated_delta import fla_backward_refusal

    leaves, cu = kernel_inputs(device, tiny)
    o_ref, g_ref = fwd_bwd("torch", leaves, cu)
    t_torch = timed(lambda: fwd_bwd("torch", leaves, cu), device, 3)
    shape = f"T={leaves[0].shape[1]} Hqk={leaves[0].shape[2]} H={leaves[2].shape[2]} d={leaves[0].shape[3]}"
    rows = [row("kernel", "gated delta: PyTorch chunked", "ok", fwd_bwd_ms=1e3 * t_torch, shape=shape,
                dtype=str(leaves[0].dtype))]
    if device.type != "cuda":
        return rows + [row("kernel", "gated delta: fla", "skipped: needs CUDA")]
    if find_spec("fla") is None:
        return rows + [row("kernel", "gated delta: fla",
                           "skipped: fla (flash-linear-attention) not installed")]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))  # noqa: E731
    names = ("dq", "dk", "dv", "dg", "dbeta")
    if why := fla_backward_refusal():  # the forward alone still compares and times
        def fwd(backend):
            with torch.no_grad():
                return forward_only(backend, leaves, cu)

        def fla_fwd_row() -> list[dict]:
            o_fla = fwd("fla")
            t_fla, t_ref = timed(lambda: fwd("fla"), device, 5), timed(lambda: fwd("torch"), device, 3)
            return [row("kernel", "gated delta: fla fwd only", "ok", fwd_ms=1e3 * t_fla, shape=shape,
                        speedup_vs_torch=t_ref / t_fla, out_max_rel_err=rel(o_fla, o_ref)),
                    row("kernel", "gated delta: fla fwd+bwd", f"skipped: {why}")]

        return rows + guarded("kernel", "gated delta: fla fwd only", fla_fwd_row)

    def fla_row() -> list[dict]:
        o_fla, g_fla = fwd_bwd("fla", leaves, cu)  # the first call compiles the kernels
        t_fla = timed(lambda: fwd_bwd("fla", leaves, cu), device, 5)
        grad_err = {f"{n}_max_rel_err": rel(a, b) for n, a, b in zip(names, g_fla, g_ref)}
        return [row("kernel", "gated delta: fla", "ok", fwd_bwd_ms=1e3 * t_fla, shape=shape,
                    speedup_vs_torch=t_torch / t_fla, out_max_rel_err=rel(o_fla, o_ref), **grad_err)]

    return rows + guarded("kernel", "gated delta: fla", fla_row)


# ---- 2. attention backends -----------------------------------------------------------------------

def attention_inputs(device, t: int, heads: int, kv_heads: int, dim: int, seed: int = 0):
    """Packed documents of mixed lengths over t tokens: q [t, H, d], k, v [t, Hkv, d], cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted({int(x) for x in torch.randint(1, t, (max(1, t // 2048),), generator=g)})
    cu = torch.tensor([0, *cuts, t], device=device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(t, h, dim, generator=g).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    return q, k, v, cu


def masked_sdpa(q, k, v, cu) -> torch.Tensor:
    """The reference: one SDPA call over all tokens with a dense [T, T] document-causal mask."""
    t = q.shape[0]
    doc = torch.searchsorted(cu[1:], torch.arange(t, device=q.device), right=True)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()

    def heads_first(x):  # [T, h, d] -> [1, H, T, d], the KV heads repeated for GQA
        return x.repeat_interleave(q.shape[1] // x.shape[1], 1).transpose(0, 1)[None]

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), attn_mask=mask)
    return out[0].transpose(0, 1)


def check_attention(device, tiny: bool, deadline: float = math.inf) -> list[dict]:
    """Each backend of model.attn_backend against masked SDPA on packed documents: the forward's
    and dq's max abs error, fwd+bwd ms of both (35B-A3B shapes: 16 q / 2 kv heads of 256)."""
    shapes = [(256, 4, 2, 32)] if tiny else [(4096, 16, 2, 256), (32768, 16, 2, 256)]
    rows = []
    for shape in shapes:
        rows += attention_rows(device, *shape, deadline)
        if device.type == "cuda":  # this shape's tensors are gone: free them before the next
            torch.cuda.empty_cache()
    return rows


def attention_rows(device, t: int, h: int, hkv: int, d: int, deadline: float) -> list[dict]:
    from model.attention_backend import packed_attention

    q, k, v, cu = attention_inputs(device, t, h, hkv, d)
    grad = torch.randn_like(q)

    def fwd_bwd(fn):
        for x in (q, k, v):
            x.grad = None
        out = fn(q, k, v, cu)
        out.backward(grad)
        return out.detach().float(), q.grad.detach().float()

    ref_out, ref_dq = fwd_bwd(masked_sdpa)
    t_ref = timed(lambda: fwd_bwd(masked_sdpa), device, 3)
    shape = f"T={t} docs={len(cu) - 1} H={h}/{hkv} d={d}"
    rows = [row("attention", f"masked SDPA T={t}", "ok", fwd_bwd_ms=1e3 * t_ref, shape=shape)]
    for backend in ("sdpa", "flex", "varlen"):
        name = f"{backend} T={t}"
        why = ("skipped: needs CUDA" if backend != "sdpa" and device.type != "cuda"
               else out_of_time(deadline, 30))
        if why:
            rows.append(row("attention", name, why))
            continue

        def one(b=backend, nm=name) -> list[dict]:
            def fn(q, k, v, cu):
                return packed_attention(q, k, v, cu, backend=b)

            out, dq = fwd_bwd(fn)  # the first call compiles (flex)
            ms = 1e3 * timed(lambda: fwd_bwd(fn), device, 3)
            return [row("attention", nm, "ok", fwd_bwd_ms=ms, speedup_vs_masked=t_ref * 1e3 / ms,
                        max_abs_err=float((out - ref_out).abs().max()),
                        dq_max_abs_err=float((dq - ref_dq).abs().max()), shape=shape)]

        rows += guarded("attention", name, one)
    return rows


# ---- 3. the MoE block ------------------------------------------------------------------------------

def check_moe(device, tiny: bool) -> list[dict]:
    """SparseMoE (router, sort, two grouped GEMMs, combine, shared expert) fwd+bwd at the 35B widths."""
    from bench_moe import make_ctx
    from model.config import load_model_config
    from model.moe import SparseMoE

    cfg = load_model_config("tiny" if tiny else PROXY)
    tokens = 256 if tiny else 4096
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    moe = SparseMoE(cfg).to(device, dtype)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)

    def step():  # a fresh context each time: it collects the auxiliary losses
        moe.zero_grad(set_to_none=True)
        moe(x, make_ctx(tokens)).float().square().mean().backward()

    step()
    t = timed(step, device, 5)
    # Megatron-Bridge's count: 3 GEMMs per routed expert and the shared one, 2 FLOPs x 3 (fwd+bwd).
    flops = 6 * 3 * cfg.hidden_size * (cfg.moe_intermediate_size * cfg.num_experts_per_tok
                                       + cfg.shared_expert_intermediate_size) * tokens
    shape = (f"E={cfg.num_experts} top{cfg.num_experts_per_tok} D={cfg.hidden_size} "
             f"F={cfg.moe_intermediate_size} tokens={tokens}")
    return [row("moe", "MoE block (grouped_mm)", "ok", fwd_bwd_ms=1e3 * t, tflops=flops / t / 1e12,
                shape=shape, dtype=str(dtype))]


# ---- 4. training runs -----------------------------------------------------------------------------

def fit_micro_batch(overrides: list[str], device, fraction: float = 0.85) -> int:
    """The largest data.batch_size (a power of two up to 64) whose estimated peak
    (parallel/memory.py) fits `fraction` of the GPU's memory; 1 if none does."""
    from parallel.layout import validate_layout
    from parallel.memory import estimate_memory, spec_from_config
    from train.main import load_config

    limit = fraction * torch.cuda.get_device_properties(device).total_memory
    best = 1
    for b in (1, 2, 4, 8, 16, 32, 64):
        cfg = load_config(overrides + [f"data.batch_size={b}"])
        layout = validate_layout(cfg.parallel, cfg.model, 1, cfg.data.seq_len)
        if estimate_memory(cfg.model, layout, spec_from_config(cfg, "cuda")).peak_bytes > limit:
            break
        best = b
    return best


def train_run(name: str, overrides: list[str], steps: int, budget_s: float, device,
              deadline: float = math.inf, profile: bool = False) -> list[dict]:
    from train.main import load_config
    from train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides + [f"run_dir={tmp}", f"train.max_steps={steps}",
                                       "checkpoint.interval=0", "checkpoint.save_final=false"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(cfg, Path(tmp))
        records, start = [], time.perf_counter()
        stop = min(start + budget_s, deadline)
        for _ in range(steps):
            t0 = time.perf_counter()
            rec = trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rec["step_time_s"] = time.perf_counter() - t0
            records.append(rec)
            if time.perf_counter() > stop:
                break
        warm = records[min(3, len(records) - 1):]  # the first steps compile and allocate
        dt = statistics.median(r["step_time_s"] for r in warm)
        tokens_s = records[-1]["tokens"] / dt
        tail = [r["loss"] for r in records[-5:]]
        tflops = trainer.flops_per_token * tokens_s / 1e12
        out = row("train", name, "ok", steps=len(records), of_steps=steps,
                  batch=f"{cfg.data.batch_size}x{cfg.data.seq_len}", step_ms=1e3 * dt,
                  tokens_per_s=tokens_s, model_tflops=tflops, mfu=tflops * 1e12 / trainer.peak_flops,
                  loss_first=records[0]["loss"], loss_last5=sum(tail) / len(tail),
                  losses=[r["loss"] for r in records], grad_accum=cfg.train.grad_accum,
                  skipped_steps=records[-1]["skipped_steps"],
                  params_m=sum(p.numel() for p in trainer.model.parameters()) / 1e6)
        if device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            out["vs_megatron"] = tflops / MEGATRON_TFLOPS
        rows = [out]
        if profile:
            rows += guarded("profile", name, functools.partial(profile_steps, trainer, device, name))
        del trainer
    gc.collect()  # the model and optimizer state go before the next run builds its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_steps(trainer, device, name: str, top: int = 15) -> list[dict]:
    """The torch profiler over two steps: the kernels that take the most device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    # Op rows (aten::mm) and annotations (Optimizer.step) repeat their kernels' device time:
    # the total is the kernels' alone, as the profiler's own "Self CUDA time total".
    own = [e for e in prof.key_averages()
           if device.type != "cuda" or e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, key, 0) for e in own) or 1
    print(f"\nprofile of {name}: top {top} by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    return [row("profile", f"{name}: {e.key[:60]}", "ok", ms_per_step=getattr(e, key, 0) / 2e3,
                share=getattr(e, key, 0) / total) for e in events]


def out_of_time(deadline: float, need_s: float) -> str | None:
    left = deadline - time.perf_counter()
    return f"skipped: {left:.0f} s left of --total-s" if left < need_s else None


def te_missing(device) -> str | None:
    if device.type != "cuda":
        return "skipped: TE FP8 needs CUDA"
    if find_spec("transformer_engine") is None:
        return "skipped: transformer_engine not importable (carry its wheel, launch/gpu_wheels.sh)"
    return None


def check_training(device, tiny: bool, steps: int, budget_s: float, recipes: list[str],
                   deadline: float = math.inf, profile: bool = False) -> list[dict]:
    full_ac = ["parallel.activation_checkpoint=full"]
    if tiny:
        base, ac = TINY_RUN, TINY_RUN + full_ac
    else:  # checkpointing frees activations: the estimate fits a larger micro-batch then
        base = PROXY_RUN + [f"data.batch_size={fit_micro_batch(PROXY_RUN, device)}"]
        ac = PROXY_RUN + full_ac + [f"data.batch_size={fit_micro_batch(PROXY_RUN + full_ac, device)}"]

    def run(name: str, overrides: list[str], n: int = steps, prof: bool = False) -> list[dict]:
        return train_run(name, overrides, n, budget_s, device, deadline, prof)

    prec = "fp32 (tiny)" if tiny else "bf16"
    accum = 2 if tiny else 8  # the optimizer step amortised over micro-batches, as a cluster run does
    runs = [(prec, base, steps, profile),
            (f"{prec}, {accum} micro-batches per step", base + [f"train.grad_accum={accum}"],
             max(4, steps // 4), False),
            (f"{prec} + full AC", ac, steps, False),
            # Emulated FP8 quantises in PyTorch: its step time says nothing, its losses do.
            ("fp8_emulated (numerics)", base + ["precision=fp8_emulated"], min(steps, 10), False)]
    runs += [(f"fp8_te {r}", base + ["precision=fp8_te", f"precision.recipe={r}"], steps, False)
             for r in recipes]
    rows = []
    for name, overrides, n, prof in runs:
        why = (te_missing(device) if name.startswith("fp8_te") else None) or out_of_time(deadline, 45)
        rows += ([row("train", name, why)] if why
                 else guarded("train", name, lambda o=overrides, k=n, nm=name, p=prof: run(nm, o, k, p)))
    ref = rows[0]
    for r in rows[1:]:
        if r["part"] == "train" and r["status"] == "ok" and ref["status"] == "ok":
            r["speedup_vs_bf16"] = r["tokens_per_s"] / ref["tokens_per_s"]  # batches may differ
            if (r["batch"], r["grad_accum"]) == (ref["batch"], ref["grad_accum"]):  # the same data
                r["loss_vs_bf16"] = same_step_loss_gap(r["losses"], ref["losses"])
    return rows


def same_step_loss_gap(losses: list[float], ref: list[float], last: int = 5) -> float:
    """Relative gap of the mean loss over the last `last` steps both runs took (same data)."""
    n = min(len(losses), len(ref))
    a, b = losses[max(0, n - last):n], ref[max(0, n - last):n]
    return (sum(a) - sum(b)) / sum(b)


# ---- 5. the smoke_1gpu experiment ---------------------------------------------------------------------

def smoke_run(name: str, extra: list[str], steps: int, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "train.main", "experiment=smoke_1gpu", f"run_dir={tmp}",
               f"train.max_steps={steps}", "train.log_interval=1", "checkpoint.interval=0",
               "checkpoint.save_final=false", "logging.wandb=disabled", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "WANDB_MODE": "disabled"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return row("smoke", name, f"failed: exit {proc.returncode}: {tail[0][:160]}")
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if x]
    timed_recs = recs[1:] or recs  # the first step compiles and allocates
    return row("smoke", name, "ok", steps=recs[-1]["step"], wall_s=wall, loss_first=recs[0]["loss"],
               loss_last=recs[-1]["loss"], mfu=recs[-1].get("mfu"),
               step_ms=1e3 * statistics.median(r["step_time_s"] for r in timed_recs))


def check_smoke(device, steps: int, timeout_s: float, deadline: float = math.inf) -> list[dict]:
    rows = []
    for name, extra in (("smoke_1gpu bf16", []), ("smoke_1gpu fp8_te", ["precision=fp8_te"])):
        if device.type != "cuda":
            why = "skipped: experiment=smoke_1gpu needs CUDA"
        else:
            why = (te_missing(device) if extra else None) or out_of_time(deadline, 30)
        limit = min(timeout_s, deadline - time.perf_counter())
        rows += [row("smoke", name, why)] if why else guarded(
            "smoke", name, lambda n=name, e=extra: [smoke_run(n, e, steps, limit)])
    return rows


# ---- report ---------------------------------------------------------------------------------------------

COLUMNS = ("part", "name", "status", "batch", "steps", "step_ms", "fwd_bwd_ms", "fwd_ms", "ms_per_step",
           "share", "tokens_per_s", "model_tflops", "tflops", "vs_megatron", "mfu", "loss_first",
           "loss_last5",
           "loss_last", "speedup_vs_bf16", "loss_vs_bf16", "speedup_vs_torch", "speedup_vs_masked",
           "max_abs_err", "dq_max_abs_err",
           "out_max_rel_err", "dq_max_rel_err", "dg_max_rel_err", "peak_mem_gb")


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def render(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    return markdown_table(cols, [[fmt(r.get(c)) for c in cols] for r in rows])


def installed_version(dist: str) -> str | None:
    """The installed distribution's version, read from its metadata (importing TE is not free)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke of this script)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 30; tiny 6)")
    p.add_argument("--budget-s", type=float, default=45.0, help="wall seconds per training run at most")
    p.add_argument("--total-s", type=float, default=480.0,
                   help="wall seconds for everything: later runs stop early or are skipped")
    p.add_argument("--recipes", default="delayed", help="comma list of TE recipes to train with")
    p.add_argument("--smoke-steps", type=int, default=10)
    p.add_argument("--parts", default="kernel,attention,moe,train,smoke", help="comma list of parts to run")
    p.add_argument("--profile", action="store_true", help="the top kernels of two BF16 proxy steps")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible; use --device cpu --tiny")
    args.steps = args.steps or (6 if args.tiny else 30)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    deadline = t0 + args.total_s
    rows: list[dict] = []
    if "train" in parts:  # first: the headline rows must not be the ones --total-s skips
        rows += check_training(device, args.tiny, args.steps, args.budget_s,
                               [r for r in args.recipes.split(",") if r], deadline, args.profile)
    if "kernel" in parts:
        rows += guarded("kernel", "gated delta", lambda: check_kernels(device, args.tiny))
    if "attention" in parts:
        rows += guarded("attention", "attention backends",
                        lambda: check_attention(device, args.tiny, deadline))
    if "moe" in parts:
        rows += guarded("moe", "MoE block", lambda: check_moe(device, args.tiny))
    if "smoke" in parts:
        rows += check_smoke(device, args.smoke_steps, timeout_s=120, deadline=deadline)
    header = machine_line() + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")
    versions = {name: installed_version(dist) for name, dist in
                (("transformer_engine", "transformer_engine"), ("fla", "flash-linear-attention"))}
    print(header)
    print(f"transformer_engine {versions['transformer_engine']}, fla {versions['fla']}, "
          f"total {time.perf_counter() - t0:.0f} s")
    print(render(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": header, "versions": versions, "rows": rows,
                                        "total_s": time.perf_counter() - t0}, indent=2) + "\n")
    return 0 if not any(r["status"].startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
