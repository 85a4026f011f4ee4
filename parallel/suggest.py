"""Layouts that fit: every (tp, ep, pp, dp_shard, activation checkpointing) for N GPUs that
`validate_layout` accepts, kept when the predicted peak (parallel/memory.py) fits the device,
ranked by the bytes a step's collectives send (parallel/comm_model.py; pipeline traffic is not
modelled there, so pp > 1 layouts rank by their per-stage share of the pp = 1 traffic).

    python -m parallel.suggest model=qwen35_397b_a17b data.seq_len=8192 data.batch_size=1 \\
        --world-size 128 --gpu-mem-gib 141

`suggest_layouts` is what `python -m parallel.rehearse --suggest` calls too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from dataclasses import dataclass, replace

from model.config import ConfigError, ModelConfig
from parallel.comm_model import StepSpec, predict
from parallel.config import ParallelConfig
from parallel.layout import Layout, validate_layout
from parallel.memory import GIB, MemoryEstimate, MemorySpec, worst_rank

AC_MODES = ("none", "selective", "full")


@dataclass
class Suggestion:
    parallel: ParallelConfig
    layout: Layout
    memory: MemoryEstimate
    comm_bytes: float       # bytes sent per step by one rank (predicted)

    def overrides(self) -> str:
        p = self.parallel
        return (f"parallel.tp={p.tp} parallel.ep={p.ep} parallel.pp={p.pp} "
                f"parallel.dp_shard={self.layout.dp_shard} parallel.activation_checkpoint="
                f"{p.activation_checkpoint}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(model_cfg: ModelConfig, world: int, base: ParallelConfig | None = None,
                      seq_len: int | None = None, grad_accum: int = 1,
                      ac_modes: tuple[str, ...] = AC_MODES) -> list[tuple[ParallelConfig, Layout]]:
    """Every (tp, ep, pp, dp_shard = the rest, AC mode) of `world` ranks that validate_layout
    accepts (dp_replicate 1; pp > 1 with 1F1B and max(grad_accum, pp) micro-batches)."""
    base = base or ParallelConfig()
    out = []
    for pp in _divisors(world):
        for tp in _divisors(world // pp):
            dp_shard = world // pp // tp
            for ep in _divisors(dp_shard):
                for ac in ac_modes:
                    p = replace(copy.deepcopy(base), tp=tp, ep=ep, pp=pp, dp_shard=dp_shard,
                                dp_replicate=1, cp=1, activation_checkpoint=ac,
                                pp_schedule="1f1b" if pp > 1 else base.pp_schedule,
                                pp_virtual_stages=1, pp_layers_per_stage=None,
                                pp_microbatches=None)
                    try:
                        L = validate_layout(p, model_cfg, world, seq_len,
                                            grad_accum=max(grad_accum, pp) if pp > 1 else grad_accum)
                    except ConfigError:
                        continue
                    out.append((p, L))
    return out


def suggest_layouts(model_cfg: ModelConfig, world: int, gpu_mem_gib: float, seq_len: int,
                    micro_batch: int, spec: MemorySpec | None = None,
                    base: ParallelConfig | None = None, grad_accum: int = 1,
                    keep_all: bool = False) -> list[Suggestion]:
    """Layouts of `world` ranks whose worst-rank peak fits `gpu_mem_gib`, fewest bytes sent first
    (ties: less memory). `spec` gives the dtypes and kernels (default: bf16 on CUDA); its
    micro_batch, seq_len and AC mode are set per layout. keep_all: also those that do not fit."""
    spec = spec or MemorySpec(micro_batch=micro_batch, seq_len=seq_len, grad_accum=grad_accum)
    with one_meta_build():
        return _suggest(model_cfg, world, gpu_mem_gib * GIB, seq_len, micro_batch, spec, base,
                        grad_accum, keep_all)


@contextlib.contextmanager
def one_meta_build():
    """comm_model builds the model on the meta device for every call (~0.5 s for 397B): build it
    once per model config while enumerating (parameters are read, never changed)."""
    import parallel.comm_model as cm

    original = getattr(cm, "meta_model", None)
    if original is None or getattr(original, "_cached", False):   # absent, or already inside one
        yield
        return
    cache: dict[str, object] = {}

    def cached(cfg):
        key = repr(cfg)
        if key not in cache:
            cache[key] = original(cfg)
        return cache[key]

    cached._cached = True
    cm.meta_model = cached
    try:
        yield
    finally:
        cm.meta_model = original


def _suggest(model_cfg, world, limit, seq_len, micro_batch, spec, base, grad_accum, keep_all):
    comm_cache: dict[tuple, float] = {}
    out = []
    for p, L in enumerate_layouts(model_cfg, world, base, seq_len, grad_accum):
        m = max(grad_accum, L.pp) if L.pp > 1 else grad_accum
        s = replace(spec, micro_batch=micro_batch, seq_len=seq_len, grad_accum=m,
                    activation_checkpoint=p.activation_checkpoint, pp_schedule=p.pp_schedule,
                    pp_virtual_stages=1, pp_microbatches=None, pp_layers_per_stage=None)
        mem = worst_rank(model_cfg, L, s)
        if mem.peak_bytes > limit and not keep_all:
            continue
        key = (L.tp, L.ep, L.pp, L.dp_shard, p.activation_checkpoint)
        if key not in comm_cache:
            comm_cache[key] = _comm_bytes(model_cfg, L, s, p.activation_checkpoint)
        out.append(Suggestion(p, L, mem, comm_cache[key]))
    out.sort(key=lambda x: (x.comm_bytes, x.memory.peak_bytes))
    return out


def _comm_bytes(cfg: ModelConfig, L: Layout, s: MemorySpec, ac: str) -> float:
    """Bytes one rank sends per step (all micro-batches). comm_model models pp = 1 only: a pp > 1
    layout counts the pp = 1 layout of its stage's ranks, divided by pp (each rank has 1/pp of
    the layers), plus the activations it sends to the next stage."""
    flat = Layout(world=L.world // L.pp, dp_shard=L.dp_shard, tp=L.tp, ep=L.ep, cp=L.cp)
    step = StepSpec(rows=s.micro_batch, seq_len=s.seq_len, param_bytes=s.param_bytes,
                    activation_checkpoint=ac)
    sent = float(sum(c.sent_total() for c in predict(cfg, flat, step)))
    if L.pp > 1:
        p2p = 2 * s.micro_batch * s.seq_len * cfg.hidden_size * s.act_bytes // L.tp
        sent = sent / L.pp + p2p * s.grad_accum
    # grad_accum > 1 without pp: the FSDP collectives that repeat per micro-batch are not modelled.
    return sent


def min_world_hint(model_cfg: ModelConfig, gpu_mem_gib: float, seq_len: int, micro_batch: int,
                   spec: MemorySpec | None = None, max_world: int = 1024) -> str:
    """'N ranks minimum: <overrides>' for the smallest power of two with a fitting layout."""
    with one_meta_build():
        return _min_world(model_cfg, gpu_mem_gib, seq_len, micro_batch, spec, max_world)


def _min_world(model_cfg, gpu_mem_gib, seq_len, micro_batch, spec, max_world) -> str:
    spec = spec or MemorySpec(micro_batch=micro_batch, seq_len=seq_len)
    w = 1
    while w <= max_world:   # full AC only and no traffic ranking: the question is only whether
        best = None         # anything fits
        for p, L in enumerate_layouts(model_cfg, w, None, seq_len, spec.grad_accum, ("full",)):
            s = replace(spec, micro_batch=micro_batch, seq_len=seq_len, activation_checkpoint="full",
                        grad_accum=max(spec.grad_accum, L.pp) if L.pp > 1 else spec.grad_accum,
                        pp_schedule=p.pp_schedule, pp_virtual_stages=1, pp_microbatches=None,
                        pp_layers_per_stage=None)
            mem = worst_rank(model_cfg, L, s)
            if mem.peak_bytes <= gpu_mem_gib * GIB and (best is None or mem.peak_bytes < best[1]):
                best = (Suggestion(p, L, mem, 0.0), mem.peak_bytes)
        if best:
            return (f"at least {w} ranks of {gpu_mem_gib:.0f} GiB, e.g. {best[0].overrides()} "
                    f"({best[1] / GIB:.1f} GiB)")
        w *= 2
    return f"no layout of up to {max_world} ranks of {gpu_mem_gib:.0f} GiB fits"


def format_table(suggestions: list[Suggestion], gpu_mem_gib: float, limit: int = 20) -> str:
    """One row per layout: sizes, AC, predicted peak memory (worst rank) and bytes sent per step."""
    head = (f"{'#':>3}  {'tp':>3} {'ep':>4} {'pp':>3} {'dp_shard':>8}  {'ac':<9} "
            f"{'peak GiB':>9} {'of':>5}  {'sent/step GiB':>13}")
    lines = [head]
    for i, s in enumerate(suggestions[:limit], 1):
        L = s.layout
        lines.append(f"{i:>3}  {L.tp:>3} {L.ep:>4} {L.pp:>3} {L.dp_shard:>8}  "
                     f"{s.parallel.activation_checkpoint:<9} {s.memory.peak_bytes / GIB:>9.1f} "
                     f"{gpu_mem_gib:>5.0f}  {s.comm_bytes / GIB:>13.2f}")
    if len(suggestions) > limit:
        lines.append(f"  ... {len(suggestions) - limit} more")
    if not suggestions:
        lines.append("  (no layout fits)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel.suggest", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.main")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--gpu-mem-gib", type=float, default=141.0)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    import os

    from parallel.memory import spec_from_config
    from train.main import load_config

    os.environ["WORLD_SIZE"] = "1"   # the config's own layout is not the question here
    try:
        cfg = load_config(list(args.overrides) + ["parallel.dp_shard=-1", "parallel.tp=1",
                                                  "parallel.ep=1", "parallel.pp=1"])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    spec = spec_from_config(cfg, "cuda")
    out = suggest_layouts(cfg.model, args.world_size, args.gpu_mem_gib, cfg.data.seq_len,
                          cfg.data.batch_size, spec, base=cfg.parallel, grad_accum=cfg.train.grad_accum)
    print(f"model={cfg.model.name} world={args.world_size} seq_len={cfg.data.seq_len} "
          f"micro_batch={cfg.data.batch_size}: {len(out)} layouts fit {args.gpu_mem_gib:.0f} GiB, "
          f"fewest bytes sent first")
    print(format_table(out, args.gpu_mem_gib, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
