"""The FP8 precision policy: which GEMM layers run FP8, the per-layer table, and the one hook the
trainer calls (`apply_precision`) right after building the model, before any parallelism.

The model stays plain PyTorch: the policy swaps the chosen modules from outside (emulated: a
subclass of the same class; te: Transformer Engine modules). Print the table of a config without
training:  python -m train.fp8_policy experiment=smoke_cpu_text precision=fp8_emulated
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn

from model.moe import GroupedExperts, TopKRouter
from parallel.spec import fp8_role
from train.fp8_config import PrecisionConfig

FP8_KINDS = ("linear", "grouped_experts")
FP8_DIM_MULTIPLE = 16  # FP8 GEMMs (cuBLASLt, TE) need both weight dims divisible by 16
_LAYER = re.compile(r"^layers\.(\d+)\.")
NOT_SWAPPED = {"embedding": "embedding: a lookup, not a GEMM",
               "router": "router: computed in fp32 by the model (model/moe.py)",
               "conv": "convolution: not swapped by the FP8 backends"}
# Under TE's delayed scaling every rank max-reduces the amaxes of all the FP8 modules it has run
# (at the autocast's exit, and in backward), and they must be the same modules on every rank; a
# rank whose micro-batch has no image runs the vision tower on zero patches, which TE is not given
# (a GEMM of no rows). (TE's other recipes keep no state across ranks.)
TE_DELAYED_VISION = "vision tower: TE delayed scaling all-reduces amaxes; image-less ranks run no TE GEMM"


@dataclass
class LayerPrecision:
    name: str
    kind: str          # linear | grouped_experts | router | embedding | conv
    shape: str
    precision: str     # fp8 | bf16 (bf16 = the run's autocast dtype, fp32 with autocast off)
    reason: str


def gemm_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every weight-multiplying module, in model order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, GroupedExperts):
            kind = "grouped_experts"
        elif isinstance(m, TopKRouter):
            kind = "router"
        elif isinstance(m, nn.Embedding):
            kind = "embedding"
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            kind = "conv"
        else:
            continue
        out.append((name, m, kind))
    return out


def _shape(m: nn.Module, kind: str) -> str:
    if kind == "grouped_experts":
        return "x".join(map(str, m.gate_up_proj.shape)) + " + " + "x".join(map(str, m.down_proj.shape))
    return "x".join(map(str, m.weight.shape))


def _dims_ok(m: nn.Module, kind: str) -> bool:
    shapes = [m.gate_up_proj.shape[1:], m.down_proj.shape[1:]] if kind == "grouped_experts" \
        else [m.weight.shape]
    return all(d % FP8_DIM_MULTIPLE == 0 for s in shapes for d in s)


def decide(name: str, m: nn.Module, kind: str, p: PrecisionConfig, num_layers: int) -> tuple[str, str]:
    """(precision, reason) of one module under policy p."""
    if not p.enabled:
        return "bf16", "precision.backend=none"
    if fp8_role(name, m) == "never":
        return "bf16", NOT_SWAPPED.get(kind, "parallel/spec.py: never FP8")
    for pat in p.excluded_patterns():
        if fnmatchcase(name, pat):
            return "bf16", f"exclude {pat!r}"
    if kind not in FP8_KINDS:
        return "bf16", NOT_SWAPPED[kind]
    if p.backend == "te" and p.recipe == "delayed" and name.startswith("visual."):
        return "bf16", TE_DELAYED_VISION
    layer = _LAYER.match(name)
    if layer:
        i = int(layer.group(1))
        if i < p.keep_first_n:
            return "bf16", f"first {p.keep_first_n} decoder layer(s) (precision.keep_first_n)"
        if i >= num_layers - p.keep_last_n:
            return "bf16", f"last {p.keep_last_n} decoder layer(s) (precision.keep_last_n)"
    if kind == "grouped_experts" and not p.grouped_experts:
        return "bf16", "precision.grouped_experts=false"
    matched = next((pat for pat in p.include if fnmatchcase(name, pat)), None)
    if matched is None:
        return "bf16", "matches no precision.include pattern"
    if not _dims_ok(m, kind):
        return "bf16", f"weight dims not multiples of {FP8_DIM_MULTIPLE} (FP8 GEMM constraint)"
    return "fp8", f"include {matched!r}"


def precision_table(model: nn.Module, p: PrecisionConfig) -> list[LayerPrecision]:
    """One row per weight-multiplying module of `model` (a plain, unparallelised one; the meta
    device will do)."""
    num_layers = len(model.layers)
    rows = []
    for name, m, kind in gemm_modules(model):
        precision, reason = decide(name, m, kind, p, num_layers)
        rows.append(LayerPrecision(name, kind, _shape(m, kind), precision, reason))
    return rows


def _weights(model: nn.Module, name: str, kind: str) -> int:
    m = model.get_submodule(name)
    if kind == "grouped_experts":
        return m.gate_up_proj.numel() + m.down_proj.numel()
    return m.weight.numel()


def format_table(rows: list[LayerPrecision], p: PrecisionConfig, model: Optional[nn.Module] = None) -> str:
    """A summary line, then (with FP8 on and precision.log_table) the per-layer table."""
    n8 = sum(r.precision == "fp8" for r in rows)
    head = (f"precision: backend={p.backend}" + (f" recipe={p.recipe} format={p.fp8_format}"
                                                 if p.enabled else "")
            + f": {n8} of {len(rows)} GEMM layers in FP8")
    if model is not None:
        total = sum(_weights(model, r.name, r.kind) for r in rows if r.kind in FP8_KINDS)
        fp8 = sum(_weights(model, r.name, r.kind) for r in rows if r.precision == "fp8")
        head += f" ({100 * fp8 / max(total, 1):.1f}% of linear/expert weights)"
    if not p.log_table or not p.enabled:
        return head
    cols = ("name", "kind", "shape", "precision", "reason")
    cells = [cols] + [(r.name, r.kind, r.shape, r.precision, r.reason) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in cells]
    return "\n".join([head, *lines])


@dataclass
class Fp8Hooks:
    """What the trainer wires in when an FP8 backend is on."""

    autocast: Callable[[], ContextManager]  # wraps every forward
    # torch.utils.checkpoint's context_fn for activation checkpointing: the recompute in backward
    # reuses the forward's FP8 scales and records no amax.
    checkpoint_contexts: Callable[[], tuple[ContextManager, ContextManager]]


def fp8_amax_group(meshes) -> Optional[dist.ProcessGroup]:
    """The ranks that share FP8 scales: those that run the same layers in step (each sees other
    data, or another shard of a weight), i.e. all but the other pipeline stages, whose amax
    all-reduces would pair with unrelated ones. `meshes`: parallel.mesh.Meshes, None: one process."""
    if meshes is None:
        return None
    if meshes.pp is None:
        return dist.group.WORLD
    names = tuple(n for n in meshes.world.mesh_dim_names if n != "pp")
    mesh = meshes.world[names[0]] if len(names) == 1 else meshes.world[names]._flatten("fp8_amax")
    return mesh.get_group()


def apply_precision(model: nn.Module, p: PrecisionConfig, device: torch.device,
                    amax_reduction_group=None, ep_size: int = 1) -> tuple[Optional[Fp8Hooks], str]:
    """Apply the policy to a freshly built, unparallelised model in place.

    Returns (the hooks to wire in, None with FP8 off; the table text to log).
    `amax_reduction_group`: the process group whose ranks share FP8 scales (see
    `fp8_amax_group`); None in a single process (the emulated backend then keeps local amaxes,
    TE would reduce over the default group). `ep_size`: parallel.ep, which will shard the experts
    (TE builds its grouped GEMMs for the local ones).
    """
    rows = precision_table(model, p)
    text = format_table(rows, p, model)
    chosen = [r.name for r in rows if r.precision == "fp8"]
    if not p.enabled:
        return None, text
    if p.backend == "emulated":
        from train import fp8_emulated

        for name in chosen:
            fp8_emulated.swap_to_emulated(model.get_submodule(name), p, amax_reduction_group)
        return Fp8Hooks(fp8_emulated.fp8_autocast, fp8_emulated.checkpoint_contexts), text
    from train import fp8_te  # only here: importing TE needs CUDA libraries

    autocast = fp8_te.apply_te(model, chosen, p, device, amax_reduction_group, ep_size)
    return Fp8Hooks(autocast, fp8_te.checkpoint_contexts), text


def main(argv: Optional[list[str]] = None) -> int:
    """Print the policy table of a composed config (same overrides as train.main), built on meta."""
    from model.config import ConfigError
    from model.params import build_meta
    from train.main import load_config

    try:
        cfg = load_config(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    model = build_meta(cfg.model)
    print(format_table(precision_table(model, cfg.precision), cfg.precision, model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
