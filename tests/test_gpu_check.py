"""benchmarks/gpu_check.py's CPU path (`--device cpu --tiny`): every part runs or says why not, and
the table it writes has one row per check with a status a reader can act on."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny",
                           "--steps", "3", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    status = {(r["part"], r["name"]): r["status"] for r in rows}
    assert all(s == "ok" or s.startswith("skipped: ") for s in status.values()), status
    ran = {k for k, s in status.items() if s == "ok"}
    assert {("kernel", "gated delta: PyTorch chunked"), ("moe", "MoE block (grouped_mm)"),
            ("attention", "masked SDPA T=256"), ("attention", "sdpa T=256"),
            ("train", "fp32 (tiny)"), ("train", "fp32 (tiny) + full AC"),
            ("train", "fp32 (tiny), 2 micro-batches per step"),
            ("train", "fp8_emulated (numerics)")} <= ran, status
    assert status[("kernel", "gated delta: fla")] == "skipped: needs CUDA"
    sdpa = next(r for r in rows if r["name"] == "sdpa T=256")
    assert sdpa["max_abs_err"] < 1e-4 and sdpa["dq_max_abs_err"] < 1e-4  # fp32 on CPU
    train = next(r for r in rows if r["name"] == "fp32 (tiny)")
    assert train["model_tflops"] > 0 and train["tokens_per_s"] > 0 and train["steps"] == 3
    fp8 = next(r for r in rows if r["name"] == "fp8_emulated (numerics)")
    assert abs(fp8["loss_vs_bf16"]) < 0.02  # the same data and steps: emulated FP8 tracks fp32
    accum = next(r for r in rows if r["name"].endswith("micro-batches per step"))
    assert accum["grad_accum"] == 2 and "loss_vs_bf16" not in accum  # other data: not compared
    assert "| part" in proc.stdout  # the table is printed
