"""The training loop: micro-batches -> loss -> clip -> AdamW step -> metrics -> checkpoints, with
exact resume. One process, or one of many under torchrun with the layout of `parallel.*`: the model
is built on the meta device, `parallel.plan.parallelize` shards it and returns the step runner the
loop drives (the same calls for every layout), and each rank materialises and initialises only its
own shards, with weights that depend on (seed, parameter name, element index), not on the layout.

Under data parallelism each rank weights its micro-batch losses by their share of the loss tokens
of the whole global batch, and FSDP sums the gradients: the result is the gradient of the global
token mean, as one process accumulating all the micro-batches would get. Logged losses are reduced
the same way; metrics are written by rank 0."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data import build_loader
from model.config import ConfigError
from model.language_model import Qwen35LM
from model.params import count_params, train_flops_per_token
from parallel.collectives import StepWatchdog
from parallel.distributed import init_distributed, rank, shutdown
from parallel.grads import clip_grad_norm_, global_grad_norm
from parallel.layout import pipeline_microbatches
from parallel.materialize import materialize, reset_all_buffers
from parallel.plan import parallelize
from train import checkpoint as ckpt
from train.config import RootConfig
from train.fp8_policy import apply_precision, fp8_amax_group
from train.metrics import MetricsLogger, console_line, peak_flops
from train.optim import build_optimizer, build_scheduler, load_scheduler_state
from train.preempt import StopRequest, Stopped
from train.precision import autocast, autocast_dtype, resolve_device
from train.report import caption_loss_gap, plot_loss_curves, write_caption_report

log = logging.getLogger("train")


class DataExhausted(Exception):
    """Some data-parallel rank's loader has no batch left for the next step."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: RootConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.train.autocast, self.device)
        self.meshes = init_distributed(cfg.parallel, cfg.model, cfg.data.seq_len, self.device)
        self.is_main = rank() == 0
        seed_everything(cfg.train.seed)  # dropout-free model: this seeds data-side randomness only

        # Built on the meta device: no parameter holds memory until this rank's shards are
        # materialised, after the plans (parallel/plan.py) have sharded the model.
        with torch.device("meta"):
            model = Qwen35LM(cfg.model)
        counts = count_params(model)
        # FP8 policy: swaps the chosen GEMM modules, before any parallelism wraps the model.
        # FP8 scales are shared by the ranks that run the same layers (all but other pp stages).
        fp8, precision_table = apply_precision(model, cfg.precision, self.device,
                                               fp8_amax_group(self.meshes), cfg.parallel.ep)
        log.info("%s", precision_table)
        self.fp8_autocast = fp8.autocast if fp8 is not None else contextlib.nullcontext
        # Activation checkpointing's recompute must quantise as the forward did.
        ac_context_fn = fp8.checkpoint_contexts if fp8 is not None else None
        self.runner = parallelize(model, self.meshes, cfg.parallel, self.device, ac_context_fn,
                                  pipeline_microbatches(cfg.parallel, cfg.train.grad_accum))
        self.runner.set_forward_context(self._forward_context)
        self.model = self.runner.model  # this rank's part, with the full model's names
        # Each rank initialises exactly its shards: the weights depend on (seed, name, index) only.
        # Weights that train.init_from_hf fills (in restore) are only allocated here.
        from_hf = bool(cfg.train.init_from_hf)
        materialize(self.model, self.device, cfg.train.seed, values=not from_hf)
        if from_hf:
            reset_all_buffers(self.model)
        one = self.meshes is None
        dp_rank, self.dp_size = (0, 1) if one else (self.meshes.dp_rank, self.meshes.dp_size)
        self.world = 1 if one else self.meshes.layout.world
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.loader = build_loader(cfg.data, dp_rank, self.dp_size)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.async_ckpt = None
        if cfg.checkpoint.async_save:
            from train.checkpoint.async_save import AsyncCheckpointer

            self.async_ckpt = AsyncCheckpointer(cfg.parallel.collective_timeout_s)
        self.step = 0
        self.skipped_steps = 0
        self.bad_streak = 0

        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops, peak_source = peak_flops(self.device, cfg.train.peak_flops)
        log.info("model %s: %.2fM parameters, %.2fM active per token, %.3g train FLOPs/token",
                 cfg.model.name, counts.total / 1e6, counts.active / 1e6, self.flops_per_token)
        log.info("device %s, autocast %s, peak %.3g FLOP/s (%s)", self.device,
                 self.amp_dtype or "off (fp32)", self.peak_flops, peak_source)

    @contextlib.contextmanager
    def _forward_context(self):
        with autocast(self.device, self.amp_dtype), self.fp8_autocast():
            yield

    # ---- checkpoints ---------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.rng_state(), "data": self.loader.state_dict(),
                "skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak,
                "dp_rank": self.loader.dp_rank, "dp_size": self.dp_size}

    def save(self) -> Optional[Path]:
        """Checkpoint this step (in the background under checkpoint.async_save); weights that are not
        all finite are never committed. Returns the committed path (None when async or refused)."""
        if not ckpt.weights_finite(self.model):
            log.error("checkpoint of step %d NOT written: the weights hold non-finite values; the "
                      "last good checkpoint stays the newest", self.step)
            return None
        c = self.cfg.checkpoint
        if self.async_ckpt is not None:
            self.async_ckpt.save(self.ckpt_dir, self.step, self.model, self.optimizer,
                                 self._extra_state(), c.keep_last)
            log.info("checkpoint of step %d staged to host memory in %.3f s; writing in the background",
                     self.step, self.async_ckpt.staging_s)
            return None
        path = ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                                    self._extra_state(), c.keep_last)
        log.info("checkpoint committed: %s", path)
        return path

    def _protect_last_good(self) -> None:
        """A run of skipped steps starts: keep the newest checkpoint from before it out of
        keep_last's reach (so the run can be rolled back from its own directory)."""
        if self.async_ckpt is not None:
            self.async_ckpt.wait()
        kept = ckpt.protect_latest(self.ckpt_dir, self.step + 1)
        if kept is not None:
            log.warning("step %d is not finite: %s is kept whatever checkpoint.keep_last says (its "
                        "KEEP file)", self.step + 1, kept)

    def restore(self) -> None:
        """Resume per train.resume (verifying checksums; a damaged newest checkpoint falls back to
        the previous good one); else take weights from train.init_from or train.init_from_hf."""
        mode = self.cfg.train.resume
        path: Optional[Path] = None
        if mode == "auto":
            path = ckpt.resumable_checkpoint(self.ckpt_dir)
        elif mode != "never":
            path = Path(mode)
            if not (path / ckpt.MARKER).exists():
                raise FileNotFoundError(f"train.resume={mode!r}: not a committed checkpoint "
                                        f"(no {ckpt.MARKER} file in it)")
            problems = ckpt.verify_checkpoint(path)
            if problems:
                raise ValueError(f"train.resume={mode!r}: the checkpoint is damaged: "
                                 f"{'; '.join(problems)}")
        if path is None:
            t = self.cfg.train
            if t.init_from:
                ckpt.load_model_weights(t.init_from, self.model)
                log.info("initialised weights from %s", t.init_from)
            elif t.init_from_hf:
                from train.checkpoint.hf_shards import load_hf_shards

                start = time.perf_counter()
                stats = load_hf_shards(self.model, t.init_from_hf, self.cfg.model)
                log.info("initialised weights from %s in %.1f s: this rank read %.1f MiB for its "
                         "%.1f MiB of shards", t.init_from_hf, time.perf_counter() - start,
                         stats["bytes_read"] / 2**20, stats["local_bytes"] / 2**20)
            return
        # Another parallel layout reshards the model and optimizer; a changed data-parallel size
        # hands the loader every old dp rank's state: it takes its virtual streams' from them.
        extra = ckpt.load_checkpoint(path, self.model, self.optimizer, self.loader.dp_rank,
                                     self.dp_size)
        self.step = extra["step"]
        load_scheduler_state(self.scheduler, extra["scheduler"])
        try:  # the loader refuses a resume that would not continue the same data stream
            if "dp_extras" in extra:
                log.info("data-parallel size %d -> %d: the loader takes its streams' states from "
                         "every old rank", len(extra["dp_extras"]), self.dp_size)
                self.loader.load_state_dict([e["data"] for e in extra["dp_extras"]])
            else:
                self.loader.load_state_dict(extra["data"])
        except ValueError as e:
            raise ConfigError(f"cannot resume from {path}: {e}") from None
        ckpt.set_rng_state(extra["rng"])
        self.skipped_steps = extra["skipped_steps"]
        self.bad_streak = extra["bad_streak"]
        log.info("resumed from %s at step %d", path, self.step)

    # ---- one optimizer step --------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg.train
        t0 = time.perf_counter()
        batches, ran_out = [], 0
        try:
            for _ in range(cfg.grad_accum):
                batches.append(next(self.loader))
        except StopIteration:  # finite data (data.epochs, data.num_docs); a partial step is dropped
            ran_out = 1
        data_wait = time.perf_counter() - t0
        local_tokens = sum(b["num_tokens"] for b in batches)
        # Loss tokens of the global batch: every data-parallel rank weights by the same total. The
        # same all-reduce tells every rank whether any ran out of data, so all stop together.
        total_tokens, ran_out = self._sum_dp([local_tokens, ran_out])
        if ran_out:
            raise DataExhausted(self.step)
        total_tokens = max(total_tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        sums, modality = self.runner.step(batches, total_tokens)

        names = sorted(sums)
        sums = dict(zip(names, self._sum_dp([sums[n] for n in names])))
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.runner.finish_grads(params)

        vision_metrics = {}
        if self.model.visual is not None:
            # Per-modality CE (token-weighted over the micro-batches and ranks; null when a step
            # had no such token) and the vision tower's gradient norm before clipping.
            flat = self._sum_dp([x for pair in modality.values() for x in pair])
            for i, name in enumerate(modality):
                total, n = flat[2 * i], flat[2 * i + 1]
                vision_metrics[name] = total / n if n else None
            vision_metrics["tokens_after_vision"] = int(flat[1])
            vision_metrics["vision_grad_norm"] = float(global_grad_norm(
                [p for p in self.model.visual.parameters() if p.grad is not None]))

        norm = self.runner.grad_norm(params)  # over every mesh and pipeline stage
        grad_norm = float(clip_grad_norm_(params, cfg.grad_clip, norm=norm) if cfg.grad_clip > 0
                          else norm)
        lr = self.scheduler.get_last_lr()[0]

        finite = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_streak = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_streak += 1
            if self.bad_streak == 1:
                self._protect_last_good()
            log.warning("step %d skipped: loss=%s grad_norm=%s", self.step + 1, sums["loss"], grad_norm)
            if self.bad_streak >= cfg.max_consecutive_bad_steps:
                raise RuntimeError(
                    f"{self.bad_streak} consecutive steps with non-finite loss or gradients "
                    f"(last: step {self.step + 1}, loss={sums['loss']}, grad_norm={grad_norm}, "
                    f"lr={lr:.3e}); lower train.lr, raise train.warmup_steps or check the data")
        self.scheduler.step()
        self.step += 1

        record = {"step": self.step, **sums, "lr": lr, "grad_norm": grad_norm,
                  "tokens": sum(b["input_ids"].numel() for b in batches) * self.dp_size,
                  "loss_tokens": total_tokens, "skipped_steps": self.skipped_steps, **vision_metrics,
                  "data_wait_s": data_wait}
        if self._logged(self.step):  # the data counters of every rank: one gather, when logged
            record.update(self._data_metrics(batches))
        record.update(self._expert_load_metrics(finite))
        return record

    def _sum_dp(self, values: list[float]) -> list[float]:
        """Sum over the data-parallel ranks (tensor-parallel ranks hold the same values)."""
        return self.runner.sum_dp(values)

    def _logged(self, step: int) -> bool:
        return step % self.cfg.train.log_interval == 0 or step == self.cfg.train.max_steps

    def _data_metrics(self, batches: list[dict]) -> dict[str, Any]:
        """Realised token share per mixture source this step, and the loaders' skip counters, over
        every data-parallel rank (ranks of one dp rank read the same data: counted once)."""
        sources: Counter = Counter()
        for b in batches:
            sources.update(b.get("source_tokens", {}))
        counters = Counter(self.loader.metrics() if hasattr(self.loader, "metrics") else {})
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Counter names differ between ranks (a kind of bad sample only one rank met): gather
            # the dicts rather than all-reduce a vector.
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.loader.dp_rank, dict(sources), dict(counters)))
            per_dp = {}
            for dp_rank, src, cnt in gathered:
                per_dp.setdefault(dp_rank, (src, cnt))
            sources, counters = Counter(), Counter()
            for src, cnt in per_dp.values():
                sources.update(src)
                counters.update(cnt)
        total = sum(sources.values())
        out: dict[str, Any] = {f"data_share/{name}": n / total if total else 0.0
                               for name, n in sorted(sources.items())}
        out.update(sorted(counters.items()))
        return out

    def _expert_load_metrics(self, update_bias: bool) -> dict[str, Any]:
        load = self.runner.collect_expert_load()
        if load is None:
            return {}
        # The routing decisions of every data-parallel rank.
        load = torch.tensor(self._sum_dp(load.flatten().tolist())).view_as(load)
        if update_bias and self.cfg.model.router_bias_balancing:
            self.runner.update_router_bias(load, self.cfg.model.router_bias_update_rate)
        per_layer = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
        out = {"expert_load_imbalance": sum(per_layer) / len(per_layer),
               "expert_load_imbalance_max": max(per_layer),
               "expert_load_imbalance_per_layer": [round(x, 4) for x in per_layer]}
        dropped = self.runner.dropped_tokens()  # over the capacity (expert_capacity_factor)
        if dropped is not None:
            out["expert_dropped_tokens"] = dropped
        return out

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.restore()
        if self.is_main:  # after the resume was accepted: a refused one leaves the old config.yaml
            OmegaConf.save(OmegaConf.structured(cfg), self.run_dir / "config.yaml")
        metrics = MetricsLogger(self.run_dir, cfg.logging.wandb, cfg.logging.project,
                                cfg.logging.run_name,
                                OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
                                enabled=self.is_main, resume_step=self.step,
                                new_run=cfg.train.resume == "never")
        history = []
        last_saved = self.step
        # Under torchrun: every rank logs a step that runs past half the collective timeout, and
        # the named collective it is in (parallel/collectives.py), before a hang ends the job.
        timeout = cfg.parallel.collective_timeout_s
        watchdog = StepWatchdog(timeout / 2, timeout) if self.meshes is not None else None
        stop = StopRequest().install()
        try:
            while self.step < cfg.train.max_steps:
                if watchdog is not None:
                    watchdog.begin(f"step {self.step + 1}")
                t0 = time.perf_counter()
                try:
                    record = self.train_step()
                except DataExhausted:
                    d = cfg.data
                    log.warning("the data ran out before step %d of train.max_steps=%d (data.epochs=%s, "
                                "data.num_docs=%s): ending the run at step %d with a final checkpoint",
                                self.step + 1, cfg.train.max_steps, d.epochs, d.num_docs, self.step)
                    break
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                record["step_time_s"] = dt
                record["tokens_per_s"] = record["tokens"] / dt
                record["mfu"] = (self.flops_per_token * record["tokens_per_s"]
                                 / (self.peak_flops * self.world))
                history.append(record)
                if self._logged(self.step):
                    metrics.log(record)
                    if self.is_main:
                        log.info(console_line(record, cfg.train.max_steps))
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
                    last_saved = self.step
                signum = stop.agreed(self.device)
                if signum is not None and self.step < cfg.train.max_steps:
                    # Preemption: Slurm sends SIGTERM, then SIGKILL after its KillWait (30 s by
                    # default), so save now, not at the next interval.
                    if last_saved != self.step:
                        self.save()
                    if self.async_ckpt is not None:  # committed before the process exits
                        self.async_ckpt.wait()
                    raise Stopped(signum, self.step, ckpt.latest_checkpoint(self.ckpt_dir))
            if watchdog is not None:
                watchdog.begin("the final checkpoint save and report")
            if (cfg.checkpoint.save_final or self.step < cfg.train.max_steps) \
                    and last_saved != self.step:
                self.save()
            if self.async_ckpt is not None:
                self.async_ckpt.wait()
            self.final_report()
        finally:
            stop.uninstall()
            if self.async_ckpt is not None:
                self.async_ckpt.close()
            if watchdog is not None:
                watchdog.close()
            metrics.close()
            shutdown()
        return history

    def final_report(self) -> None:
        """The held-out caption check (vision models, when asked for; every rank runs the same
        held-out batches through the sharded model) and the loss-curve plot, written by rank 0."""
        if self.cfg.train.heldout_caption_docs and self.model.visual is not None:
            result = caption_loss_gap(self.model, self.cfg.data, self.cfg.train.heldout_caption_docs,
                                      self.device, self.amp_dtype, seed=self.cfg.train.seed)
            if self.is_main:
                write_caption_report(result, self.run_dir)
        if not self.is_main:
            return
        metrics_file = self.run_dir / "metrics.jsonl"
        if metrics_file.exists():
            records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
            plot_loss_curves(records, self.run_dir / "loss_curves.png")
            log.info("loss curves: %s", self.run_dir / "loss_curves.png")
