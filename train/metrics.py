"""Run outputs: metrics.jsonl (one JSON object per logged step), the console line, wandb, and the
peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("train")

# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by name fragment.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "B200": 2250e12,
                 "GB200": 2500e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device, configured: Optional[float]) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if configured:
        return configured, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, peak in GPU_PEAK_BF16.items():
            if frag in name:
                return peak, f"table ({name})"
        return measure_matmul_flops(device, torch.bfloat16), f"measured bf16 matmul ({name})"
    return measure_matmul_flops(device, torch.float32), "measured fp32 matmul (cpu)"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024,
                         seconds: float = 0.3) -> float:
    """Best achieved FLOP/s of an n x n matmul over ~`seconds`: the CPU's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


class MetricsLogger:
    """Appends one JSON object per logged step to <run_dir>/metrics.jsonl and mirrors it to wandb.

    `resume_step`: the step the run (re)starts from (`new_run`: train.resume=never); records of later steps, logged by the attempt
    that crashed or was killed before its next checkpoint, are dropped (`drop_records_after`), so
    the steps run again are logged once and the file reads as an uninterrupted run's.

    wandb: every start of one run directory continues the same wandb run, whose id is kept in
    <run_dir>/wandb_run_id (WANDB_RUN_ID, if set, wins). The steps an earlier attempt already sent
    (those up to the last record of metrics.jsonl) are not sent again: a resume is exact, so their
    values are the same, and wandb would otherwise get them twice (or drop them as out of order)."""

    def __init__(self, run_dir: Path, wandb_mode: str, project: str, run_name: Optional[str],
                 config: dict[str, Any], enabled: bool = True, resume_step: Optional[int] = None,
                 new_run: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sent_up_to = 0  # the last step an earlier attempt logged to wandb
        if enabled and resume_step is not None:
            if not new_run:
                self.sent_up_to = last_logged_step(self.path)
            drop_records_after(self.path, resume_step)
        if enabled and new_run:  # train.resume=never in a used run directory: a new wandb run
            (Path(run_dir) / "wandb_run_id").unlink(missing_ok=True)
        self.wandb = None
        if enabled and wandb_mode != "disabled":
            import wandb  # imported only when used: it is slow to import

            run_id = wandb_run_id(Path(run_dir))
            self.wandb = wandb.init(mode=wandb_mode, project=project, name=run_name, id=run_id,
                                    dir=str(run_dir), config=config, resume="allow")
            if self.sent_up_to:
                log.info("wandb run %s continues; steps up to %d were sent by an earlier attempt",
                         run_id, self.sent_up_to)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None and clean["step"] > self.sent_up_to:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))},
                           step=clean["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run directory: WANDB_RUN_ID, else <run_dir>/wandb_run_id, created
    (atomically) on the first start: 8 lowercase letters and digits, as wandb makes them."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    path = run_dir / "wandb_run_id"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def last_logged_step(path: Path) -> int:
    """The largest step of the complete records of a metrics.jsonl (0 when none)."""
    last = 0
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                last = max(last, record["step"])
    return last


def drop_records_after(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` in the JSONL file `path`; a torn line (the write of a
    killed process) goes too. The file is replaced atomically (a new file renamed over it), so a
    crash here leaves the old or the new file, never half of one. -> records dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text()
    kept, dropped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped or (text and not text.endswith("\n")):  # an unterminated line glues to the next
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if dropped:
            log.info("%s: dropped %d record(s) after step %d, the step this run resumes from",
                     path, dropped, step)
    return dropped


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def console_line(r: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {r['step']}/{max_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
             f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s'] / 1e3:.1f}k tok/s",
             f"mfu {100 * r['mfu']:.2f}%"]
    if r.get("ce_after_vision") is not None:
        parts.append(f"ce|vision {r['ce_after_vision']:.3f}")
    if r.get("ce_text") is not None:
        parts.append(f"ce|text {r['ce_text']:.3f}")
    if "vision_grad_norm" in r:
        parts.append(f"vgnorm {r['vision_grad_norm']:.3f}")
    if "expert_load_imbalance" in r:
        parts.append(f"imbalance {r['expert_load_imbalance']:.2f}")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)
