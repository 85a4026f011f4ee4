"""AdamW with weight-decay groups, and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from train.config import TrainConfig

# Parameters that set scales or decay rates rather than features: decaying them towards 0 would
# change what the layer computes, not regularise it.
NO_DECAY_SUFFIXES = ("bias", "A_log", "dt_bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in NO_DECAY_SUFFIXES or "norm" in name or param.ndim < 2


def mesh_key(p: torch.Tensor) -> tuple:
    """() for a plain tensor; the mesh's dimension names and ranks for a DTensor."""
    mesh = getattr(p, "device_mesh", None)
    return () if mesh is None else (mesh.mesh_dim_names or (), tuple(mesh.mesh.flatten().tolist()))


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """Groups: (language | vision) x (decay | no decay); the vision tower's lr is
    cfg.lr * cfg.vision_lr_scale. Empty groups are dropped. Under parallel plans the groups are
    split further by mesh: the foreach kernels take plain tensors or DTensors of one mesh per call.

    `fused`: the fused AdamW kernel (no parameter-sized temporaries), by default on CUDA; the
    rehearsal asks for it on its fake CPU device to run the GPU's optimizer step."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (name.startswith("visual."), no_weight_decay(name, p), mesh_key(p))
            groups.setdefault(key, []).append(p)
    groups = [{"params": params, "weight_decay": 0.0 if skip_decay else cfg.weight_decay,
               "lr": cfg.lr * (cfg.vision_lr_scale if vision else 1.0)}
              for (vision, skip_decay, _), params in sorted(groups.items())]
    if fused is None:
        fused = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for the optimizer step `step` (0-based).

    cosine: linear warmup, then cosine from 1 to min_lr_ratio at the horizon.
    wsd:    linear warmup, constant, then a linear decay to min_lr_ratio over the last
            wsd_decay_fraction of the horizon.
    The horizon is lr_decay_steps, or max_steps when that is unset; past it the lr stays at the floor.
    """
    horizon = cfg.lr_decay_steps or cfg.max_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(horizon - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(round(horizon * cfg.wsd_decay_fraction)), 1)
    decay_start = horizon - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


def load_scheduler_state(scheduler, sd: dict) -> None:
    """Restore the schedule's position only (`last_epoch`, `_step_count`) and set each group's lr
    from it. The saved `base_lrs` are one per optimizer group, and the groups differ between
    parallel layouts (they split by mesh); the base lrs come from the config in any layout."""
    scheduler.last_epoch = int(sd["last_epoch"])
    scheduler._step_count = int(sd["_step_count"])
    lrs = [base * fn(scheduler.last_epoch)
           for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
