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

    `resume_step`: the step the run (re)starts from; records of later steps, logged by the attempt
    that crashed or was killed before its next checkpoint, are dropped (`drop_records_after`), so
    the steps run again are logged once and the file reads as an uninterrupted run's.

    wandb: every start of one run directory continues the same wandb run, whose id is kept in
    <run_dir>/wandb_run_id (WANDB_RUN_ID, if set, wins; `new_run`, i.e. train.resume=never, starts
    another). A start first sends the records of metrics.jsonl (up to the resume step) that wandb
    is not known to hold, then only new steps: the steps an earlier attempt sent and finished
    (`wandb_sent_step`, written when wandb ends) are not sent again (a resume is exact, so their
    values are the same). An attempt whose wandb did not finish (killed, or wandb's service
    stopped by Slurm's SIGTERM, which loses its buffer) confirms nothing, so its steps are sent
    again; wandb keeps one value per step of a resumed run. wandb failing never stops the run."""

    def __init__(self, run_dir: Path, wandb_mode: str, project: str, run_name: Optional[str],
                 config: dict[str, Any], enabled: bool = True, resume_step: Optional[int] = None,
                 new_run: bool = False):
        self.enabled = enabled
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.sent_file = run_dir / "wandb_sent_step"
        self.sent_up_to = 0  # the last step sent to wandb, by this or an earlier attempt
        if enabled and not new_run and self.sent_file.exists():
            try:
                self.sent_up_to = min(last_logged_step(self.path), int(self.sent_file.read_text()))
            except ValueError:
                pass
        self.confirmed = self.sent_up_to  # what wandb is known to hold: its run was finished
        if enabled:
            self.sent_file.unlink(missing_ok=True)  # written again when this attempt ends
        if enabled and resume_step is not None:
            drop_records_after(self.path, resume_step)
        if enabled and new_run:  # train.resume=never in a used run directory: a new wandb run
            (run_dir / "wandb_run_id").unlink(missing_ok=True)
        self.wandb = None
        if enabled and wandb_mode != "disabled":
            import wandb  # imported only when used: it is slow to import

            run_id = wandb_run_id(run_dir)
            try:
                self.wandb = wandb.init(mode=wandb_mode, project=project, name=run_name, id=run_id,
                                        dir=str(run_dir), config=config, resume="allow")
            except Exception as e:  # noqa: BLE001 - e.g. no network in online mode
                log.warning("wandb.init failed (%s: %s): training goes on without wandb; the next "
                            "start sends the steps from %d", type(e).__name__, e, self.confirmed + 1)
                self._end_wandb()
                return
            if self.sent_up_to:
                log.info("wandb run %s continues after step %d", run_id, self.sent_up_to)
            for record in read_records(self.path):  # logged, but not yet in wandb
                if record["step"] > self.sent_up_to:
                    self._send(record)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        self._send(clean)

    def _send(self, clean: dict[str, Any]) -> None:
        if self.wandb is None or clean["step"] <= self.sent_up_to:
            return
        try:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))},
                           step=clean["step"])
        except Exception as e:  # noqa: BLE001 - a metrics mirror must not stop training
            log.warning("wandb failed at step %d (%s: %s): metrics.jsonl goes on, the next start "
                        "sends wandb the steps from %d", clean["step"], type(e).__name__, e,
                        self.confirmed + 1)
            self._end_wandb()
            return
        self.sent_up_to = clean["step"]

    def _end_wandb(self, failed: bool = True) -> None:
        # Only a finished run is known to hold what was sent: wandb's service buffers, and a
        # SIGTERM (which Slurm sends it too) or SIGKILL loses the buffer.
        if not failed:
            self.confirmed = self.sent_up_to
        self.sent_file.write_text(f"{self.confirmed}\n")
        self.wandb = None
        if failed:
            import wandb

            try:  # a broken service connection: the next wandb.init of this process starts afresh
                wandb.teardown()
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if self.wandb is None:
            return
        try:
            self.wandb.finish()
        except Exception as e:  # noqa: BLE001 - e.g. its service process already stopped
            log.warning("wandb.finish failed (%s: %s)", type(e).__name__, e)
            self._end_wandb(failed=True)
            return
        self._end_wandb(failed=False)


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


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a metrics.jsonl (a torn last line is left out)."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
    return out


def last_logged_step(path: Path) -> int:
    """The largest step of the complete records of a metrics.jsonl (0 when none)."""
    return max((r["step"] for r in read_records(path)), default=0)


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
