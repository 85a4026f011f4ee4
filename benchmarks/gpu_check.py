"""The one-GPU check: a machine with one GPU runs it in under five minutes; it installs nothing
and reads nothing from the network. Prints a short table and writes it as JSON (--out).

    python benchmarks/gpu_check.py --out gpu_check.json              # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --out x.json  # the CPU-runnable parts

Parts, each guarded (a missing package or device gives a 'skipped: why' row, an exception an
'error: ...' row, and the other parts still run):

1. kernel: flash-linear-attention's chunked gated delta rule against the project's PyTorch chunked
   kernel (model/ops/gated_delta.py) on the same packed bf16 inputs with fewer query/key heads
   than value heads, as the model calls it (the call repeats them for fla): forward and gradient
   max errors (relative to the largest reference value) and fwd+bwd time of each.
2. train: a mid-size hybrid MoE model (built here from ModelConfig fields, sized to keep an H200
   busy) trained on the learnable synthetic text for --steps steps with BF16, then with TE FP8
   (precision=fp8_te, delayed scaling; --recipes adds others): median step time, tokens/s, MFU
   (against the GPU's dense BF16 peak, for both runs), first and last losses, peak memory.
   Each run stops early at --budget-s seconds and says how many steps it did.
Everything stops at --total-s (default 285 s): a run ends early, a part not started is skipped.
3. smoke: `python -m train.main experiment=smoke_1gpu` for a few steps, with BF16 and with
   precision=fp8_te, as a user would start it.
"""

from __future__ import annotations

import argparse
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

# A mid-size Qwen3.5-style model: the 35B-A3B's widths (hidden 2048, 16/32 DeltaNet heads of 128,
# 16 query / 2 KV heads of 256 -> 128 here), fewer layers and experts so that fp32 master weights
# plus AdamW state (~40 GB) and bf16 activations of 8 x 2048 tokens fit an H200 with room left.
MID_MODEL = ["model.name=mid_check", "model.vocab_size=1024", "model.hidden_size=2048",
             "model.num_layers=12", "model.num_attention_heads=16", "model.num_key_value_heads=2",
             "model.head_dim=128", "model.mrope_section=null", "model.linear_num_key_heads=16",
             "model.linear_num_value_heads=32", "model.linear_key_head_dim=128",
             "model.linear_value_head_dim=128", "model.num_experts=32", "model.num_experts_per_tok=4",
             "model.moe_intermediate_size=1024", "model.shared_expert_intermediate_size=1024",
             "model.mtp_num_layers=0"]
MID_RUN = ["data.seq_len=2048", "data.batch_size=8", "train.device=cuda", "train.autocast=bf16",
           "train.lr=1e-3", "train.warmup_steps=20", "logging.wandb=disabled", "train.resume=never"]
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
        return [row(part, name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}")]


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

    def fla_row() -> list[dict]:
        o_fla, g_fla = fwd_bwd("fla", leaves, cu)  # the first call compiles the kernels
        t_fla = timed(lambda: fwd_bwd("fla", leaves, cu), device, 5)
        grad_err = {f"{n}_max_rel_err": rel(a, b) for n, a, b in zip(names, g_fla, g_ref)}
        return [row("kernel", "gated delta: fla", "ok", fwd_bwd_ms=1e3 * t_fla, shape=shape,
                    speedup_vs_torch=t_torch / t_fla, out_max_rel_err=rel(o_fla, o_ref), **grad_err)]

    return rows + guarded("kernel", "gated delta: fla", fla_row)


# ---- 2. training runs -----------------------------------------------------------------------------

def train_run(name: str, overrides: list[str], steps: int, budget_s: float, device,
              deadline: float = math.inf) -> dict:
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
        warm = records[min(5, len(records) - 1):]  # the first steps compile and allocate
        dt = statistics.median(r["step_time_s"] for r in warm)
        tokens_s = records[-1]["tokens"] / dt
        tail = [r["loss"] for r in records[-10:]]
        out = row("train", name, "ok", steps=len(records), of_steps=steps,
                  step_ms=1e3 * dt, tokens_per_s=tokens_s,
                  mfu=trainer.flops_per_token * tokens_s / trainer.peak_flops,
                  loss_first=records[0]["loss"], loss_last10=sum(tail) / len(tail),
                  skipped_steps=records[-1]["skipped_steps"],
                  params_m=sum(p.numel() for p in trainer.model.parameters()) / 1e6)
        if device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        del trainer
    gc.collect()  # the model and optimizer state go before the next run builds its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def out_of_time(deadline: float, need_s: float) -> str | None:
    left = deadline - time.perf_counter()
    return f"skipped: {left:.0f} s left of --total-s" if left < need_s else None


def te_missing(device) -> str | None:
    if device.type != "cuda":
        return "skipped: TE FP8 needs CUDA"
    if find_spec("transformer_engine") is None:
        return "skipped: transformer_engine not installed"
    return None


def check_training(device, tiny: bool, steps: int, budget_s: float, recipes: list[str],
                   deadline: float = math.inf) -> list[dict]:
    base = TINY_RUN if tiny else MID_MODEL + MID_RUN

    def run(name: str, extra: list[str]) -> list[dict]:
        return [train_run(name, base + extra, steps, budget_s, device, deadline)]

    rows = guarded("train", "bf16", lambda: run("bf16", []))
    for recipe in recipes:
        name = f"fp8_te {recipe}"
        why = te_missing(device) or out_of_time(deadline, 60)
        if why:
            rows.append(row("train", name, why))
            continue
        rows += guarded("train", name,
                        lambda r=recipe: run(name, ["precision=fp8_te", f"precision.recipe={r}"]))
    if tiny:  # the CPU stand-in for the FP8 row: the same policy, emulated
        rows += guarded("train", "fp8_emulated delayed",
                        lambda: run("fp8_emulated delayed", ["precision=fp8_emulated"]))
    ref = rows[0]
    for r in rows[1:]:
        if r["status"] == "ok" and ref["status"] == "ok":
            r["speedup_vs_bf16"] = ref["step_ms"] / r["step_ms"]
            r["loss_last10_vs_bf16"] = r["loss_last10"] - ref["loss_last10"]
    return rows


# ---- 3. the smoke_1gpu experiment ---------------------------------------------------------------------

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
            return row("smoke", name, f"error: exit {proc.returncode}: {tail[0][:160]}")
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

COLUMNS = ("part", "name", "status", "steps", "step_ms", "fwd_bwd_ms", "mfu", "loss_first", "loss_last10",
           "loss_last", "speedup_vs_bf16", "speedup_vs_torch", "out_max_rel_err", "dq_max_rel_err",
           "dg_max_rel_err", "peak_mem_gb")


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
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; tiny 6)")
    p.add_argument("--budget-s", type=float, default=45.0, help="wall seconds per training run at most")
    p.add_argument("--total-s", type=float, default=285.0,
                   help="wall seconds for everything: later runs stop early or are skipped")
    p.add_argument("--recipes", default="delayed", help="comma list of TE recipes to train with")
    p.add_argument("--smoke-steps", type=int, default=10)
    p.add_argument("--parts", default="kernel,train,smoke", help="comma list of parts to run")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible; use --device cpu --tiny")
    args.steps = args.steps or (6 if args.tiny else 200)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    deadline = t0 + args.total_s
    rows: list[dict] = []
    if "kernel" in parts:
        rows += guarded("kernel", "gated delta", lambda: check_kernels(device, args.tiny))
    if "train" in parts:
        rows += check_training(device, args.tiny, args.steps, args.budget_s,
                               [r for r in args.recipes.split(",") if r], deadline)
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
    return 0 if not any(r["status"].startswith("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
