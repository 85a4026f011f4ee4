"""Parallel layouts on CPU: the bytes each collective moves per training step (counted by
parallel/comm_count.py, next to parallel/comm_model.py's prediction) and the step time of each
layout against one process running the same global batch; then the analytic table for the 397B
config on 64 GPUs.

    python benchmarks/bench_parallel.py                       # tiny_vl, LAYOUTS, then the 397B table
    python benchmarks/bench_parallel.py --model smoke_vl --rows 16 --seq-len 256 --layouts "dp_shard=2"
    python benchmarks/bench_parallel.py --only-397b --details # the 397B tables alone, no ranks

Per layout, gloo ranks (OMP_NUM_THREADS=1 each) run `parallel_step` (the collectives of
train/trainer.py's train_step: the token total, forward, token-weighted backward, the logged loss
sums, gradient placements, the vision plan's gradient sum, the vision metrics, clipping, the
optimizer, the expert load): one warmup step, one counted step (under CommCounter), then `--steps`
timed steps (no counter: the dispatch mode slows every op). The baseline is one process (one
thread, as each rank has) running the same global batch (the dp micro-batches as one batch) through
the same step without collectives, run by rank 0 between the layout's steps (the other ranks wait
in a barrier), so that both take turns under the same load. Step time: the median over steps (of
the slowest rank's time for the layout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

if __package__:  # imported as benchmarks.bench_parallel (tests/test_comm_accounting.py)
    from benchmarks.common import OtherLoad, machine_line, markdown_table
else:             # run as a script: common puts the checkout on sys.path
    import common  # noqa: F401
    from common import OtherLoad, machine_line, markdown_table

import torch
import torch.distributed as dist

from model.config import load_model_config
from model.language_model import Qwen35LM
from model.moe import collect_expert_load
from parallel.comm_count import CommCounter, CommStat, CommTable, mesh_group_labels
from parallel.comm_model import EPTraffic, StepSpec, by_source, predict, predict_table, to_table
from parallel.config import ParallelConfig
from parallel.context_parallel import sum_over_cp
from parallel.distributed import sum_over
from parallel.expert_parallel import collect_comm_bytes
from parallel.grads import clip_grad_norm_, global_grad_norm, match_grad_placements
from parallel.mesh import build_meshes, validate_layout
from parallel.plan import parallelize
from parallel.vision_plan import reduce_vision_grads

LOSS_NAMES = ("loss", "ce", "mtp_ce", "moe_aux", "moe_z")
INPUT_KEYS = ("input_ids", "position_ids", "cu_seqlens", "labels", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw")

# (name, world, parallel sizes, vision plan); sizes may carry activation_checkpoint
LAYOUTS = [
    ("dp_shard=2", 2, {"dp_shard": 2}, "balanced"),
    ("tp=2 (vision balanced)", 2, {"tp": 2}, "balanced"),
    ("tp=2 (vision replicated)", 2, {"tp": 2}, "replicated"),
    ("ep=2 (dp_shard=2)", 2, {"dp_shard": 2, "ep": 2}, "balanced"),
    ("dp_shard=2 x tp=2", 4, {"dp_shard": 2, "tp": 2}, "balanced"),
    ("tp=2 x ep=2 (dp_shard=2)", 4, {"dp_shard": 2, "tp": 2, "ep": 2}, "balanced"),
    ("HSDP dp_replicate=2 x dp_shard=2, ep=2", 4, {"dp_replicate": 2, "dp_shard": 2, "ep": 2},
     "balanced"),
    ("tp=2 x ep=2 (dp_shard=2), full AC", 4,
     {"dp_shard": 2, "tp": 2, "ep": 2, "activation_checkpoint": "full"}, "balanced"),
]
# Run by name with --layouts (they add time, not coverage of another plan).
EXTRA_LAYOUTS = [
    ("HSDP dp_replicate=2 x dp_shard=2", 4, {"dp_replicate": 2, "dp_shard": 2}, "balanced"),
    ("dp_shard=2 x tp=2, selective AC", 4,
     {"dp_shard": 2, "tp": 2, "activation_checkpoint": "selective"}, "balanced"),
    ("cp=2", 2, {"cp": 2}, "balanced"),
    ("cp=2 x tp=2", 4, {"cp": 2, "tp": 2}, "balanced"),
]


# ---- the step ----------------------------------------------------------------------------------

def micro_batch(index: int, rows: int, seq_len: int) -> dict:
    """The index-th micro-batch of image-caption and text documents (tests/vision_fixtures.py):
    2 x rows image-caption documents and some text ones, packed into rows of seq_len tokens (as
    many rows as they fill: fewer than `rows` when seq_len is long)."""
    from tests.vision_fixtures import ToyTokenizer, caption_batch

    return caption_batch(ToyTokenizer(), index, rows=rows, seq_len=seq_len)


def concat_batches(batches: list[dict]) -> dict:
    """The global batch as one: rows stacked, cu_seqlens shifted, visual items in order."""
    out = {"input_ids": torch.cat([b["input_ids"] for b in batches]),
           "labels": torch.cat([b["labels"] for b in batches]),
           "position_ids": torch.cat([b["position_ids"] for b in batches], dim=-2),
           "num_tokens": sum(b["num_tokens"] for b in batches)}
    cu, offset = [torch.zeros(1, dtype=torch.long)], 0
    for b in batches:
        cu.append(b["cu_seqlens"][1:] + offset)
        offset += b["input_ids"].numel()
    out["cu_seqlens"] = torch.cat(cu)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [b[key] for b in batches if key in b]
        if parts:
            out[key] = torch.cat(parts)
    return out


def image_patches(batch: dict) -> tuple[int, ...]:
    """t*h*w of each image, then each video, as the model's single encoder call orders them."""
    grids = [batch[k] for k in ("image_grid_thw", "video_grid_thw") if k in batch]
    return tuple(int(t * h * w) for g in grids for t, h, w in g.tolist())


def parallel_step(model: Qwen35LM, meshes, batch: dict, opt: torch.optim.Optimizer,
                  clip: float = 1.0) -> float:
    """One optimizer step with the collectives of train/trainer.py's `train_step` (grad_accum 1).
    meshes None: one process, no collectives. -> the loss."""
    loss_mesh = meshes.loss if meshes is not None else None
    total = max(sum_over([batch["num_tokens"]], loss_mesh)[0], 1)
    out = model(**{k: batch[k] for k in INPUT_KEYS if k in batch})
    (out.loss * (batch["num_tokens"] / total)).backward()
    values = [float(getattr(out, n).detach()) for n in LOSS_NAMES if getattr(out, n) is not None]
    sum_over(values, loss_mesh)
    params = [p for p in model.parameters() if p.grad is not None]
    if meshes is not None:
        match_grad_placements(params)
        reduce_vision_grads(model)
    if model.visual is not None:
        sum_over([0.0, 0, 0.0, 0], loss_mesh)  # the per-modality CE sums and token counts
        global_grad_norm([p for p in model.visual.parameters() if p.grad is not None])
    clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    load = collect_expert_load(model)
    if load is not None:
        if meshes is not None and meshes.cp is not None:  # the slices' counts (as the runner)
            load = sum_over_cp(load, meshes.cp)
        sum_over(load.flatten().tolist(), loss_mesh)
    return float(out.loss.detach())


def build(model_name: str, mtp: int | None = None) -> Qwen35LM:
    torch.manual_seed(0)
    return Qwen35LM(model_config(model_name, mtp))


# ---- one layout on gloo ranks ------------------------------------------------------------------

def run_layout(rank: int, world: int, sizes: dict, vision: str, model_name: str, mtp, rows: int,
               seq_len: int, steps: int, out_dir: str) -> None:
    """One layout on this rank: warmup, a counted step, `steps` timed steps; writes
    rank<r>.json to out_dir (the counted table, the EP dispatchers' own byte counts, the times)."""
    # The ViT's and the MTP block's outputs are views (FSDP2 warns; the counts show their
    # backward all-gathers do run).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    model = build(model_name, mtp)
    cfg = model.cfg
    pcfg = ParallelConfig(**sizes)
    pcfg.vision.name = vision
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=seq_len), "cpu")
    parallelize(model, meshes, pcfg, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dp = meshes.dp_size
    batch = micro_batch(meshes.dp_rank, rows, seq_len)

    parallel_step(model, meshes, batch, opt)                         # warmup
    collect_comm_bytes(model)
    counter = CommCounter(mesh_group_labels(meshes))
    with counter:
        parallel_step(model, meshes, batch, opt)
    ep = collect_comm_bytes(model)
    times, base_times = timed_rounds(model, meshes, batch, opt, steps, rows, seq_len, model_name, mtp)
    result = {"rank": rank, "dp": dp, "patches": image_patches(batch),
              "shape": list(batch["input_ids"].shape),
              "counted": [[k, g, s.calls, s.payload, str(s.sent)] for (k, g), s in counter.table().items()],
              "ep_sent": ep["tokens_sent"], "ep_local": ep["tokens_local"], "times": times,
              "base_times": base_times}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def timed_rounds(model, meshes, batch, opt, steps: int, rows: int, seq_len: int, model_name: str,
                 mtp) -> tuple[list[float], list[float]]:
    """`steps` rounds of: one step of the layout on all ranks (the slowest rank's time), then one
    step of the baseline on rank 0 alone while the others wait in a barrier: one process, one
    thread, the dp micro-batches as one batch, no collectives. Taking turns, both see the same
    load from whatever else runs on the machine."""
    rank = dist.get_rank()
    if rank == 0 and steps:
        base = build(model_name, mtp)
        base_opt = torch.optim.AdamW(base.parameters(), lr=1e-3)
        base_batch = concat_batches([micro_batch(r, rows, seq_len) for r in range(meshes.dp_size)])
        parallel_step(base, None, base_batch, base_opt)                # warmup
    times, base_times = [], []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        parallel_step(model, meshes, batch, opt)
        dt = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        times.append(float(dt))
        if rank == 0:
            t0 = time.perf_counter()
            parallel_step(base, None, base_batch, base_opt)
            base_times.append(time.perf_counter() - t0)
        dist.barrier()
    return times, base_times


def _entry(rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_layout(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_layout(world: int, sizes: dict, vision: str, model_name: str, mtp, rows: int,
                 seq_len: int, steps: int) -> list[dict]:
    """Run `run_layout` on `world` gloo ranks; -> each rank's result."""
    import torch.multiprocessing as mp

    from common import free_port_hint

    port = free_port_hint()
    with tempfile.TemporaryDirectory() as out:
        args = (sizes, vision, model_name, mtp, rows, seq_len, steps, out)
        mp.spawn(_entry, args=(world, port, args), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def counted_table(result: dict) -> CommTable:
    from fractions import Fraction

    return {(k, g): CommStat(calls, payload, Fraction(sent))
            for k, g, calls, payload, sent in result["counted"]}


def layout_spec(result: dict, vision: str, pcfg: ParallelConfig) -> StepSpec:
    """The analytic model's view of the step a rank ran (its micro-batch's shape and images)."""
    rows, seq_len = result["shape"]
    return StepSpec(rows=rows, seq_len=seq_len, image_patches=tuple(result["patches"]),
                    vision_plan=vision, rank=result["rank"],
                    reshard_after_forward=pcfg.reshard_after_forward,
                    activation_checkpoint=pcfg.activation_checkpoint,
                    selective_ac_every=pcfg.selective_ac_every)


# ---- printing ----------------------------------------------------------------------------------

def kb(n) -> str:
    return f"{float(n) / 1e3:.1f}"


def gb(n) -> str:
    return f"{float(n) / 1e9:.2f}"


def comparison_rows(counted: CommTable, uniform: CommTable, exact: CommTable) -> list[list[str]]:
    rows = []
    for key in sorted(set(counted) | set(uniform)):
        c, u, e = (t.get(key, CommStat()) for t in (counted, uniform, exact))
        match = "yes" if (c.calls, c.payload, c.sent) == (e.calls, e.payload, e.sent) else "NO"
        rows.append([key[0], key[1], str(c.calls), kb(c.sent), kb(u.sent), match])
    total = [sum((t[k].sent for k in t), start=0) for t in (counted, uniform)]
    rows.append(["total", "", str(sum(s.calls for s in counted.values())), kb(total[0]), kb(total[1]), ""])
    return rows


class LoadBesidesUs(OtherLoad):
    """OtherLoad that also counts this benchmark's own (joined) rank processes as ours."""

    @staticmethod
    def _snapshot():
        snap = OtherLoad._snapshot()
        if snap is None:
            return None
        busy, own, wall = snap
        t = os.times()
        return busy, own + t.children_user + t.children_system, wall


def model_config(name: str, mtp):
    cfg = load_model_config(name)
    if mtp is not None:
        cfg.mtp_num_layers = mtp
    return cfg


def bench_layouts(args) -> None:
    cfg = model_config(args.model, args.mtp)
    shape = tuple(micro_batch(0, args.rows, args.seq_len)["input_ids"].shape)
    print(f"## {args.model} (mtp {cfg.mtp_num_layers}): micro-batches of {shape[0]} x {shape[1]} "
          f"tokens per data-parallel rank (--rows {args.rows}), fp32; bytes sent per rank per step "
          f"(rank 0), kB\n")
    load = LoadBesidesUs()
    summary = []
    chosen = [lay for lay in LAYOUTS + EXTRA_LAYOUTS if lay[0] in args.layouts] if args.layouts else LAYOUTS
    for name, world, sizes, vision in chosen:
        results = spawn_layout(world, sizes, vision, args.model, args.mtp, args.rows, args.seq_len,
                               args.steps)
        r0 = results[0]
        base = statistics.median(r0["base_times"])
        pcfg = _pcfg(sizes, vision)
        layout = validate_layout(pcfg, cfg, world, seq_len=args.seq_len)
        spec = layout_spec(r0, vision, pcfg)
        counted = counted_table(r0)
        uniform = predict_table(cfg, layout, spec)
        exact = predict_table(cfg, layout, spec, EPTraffic(r0["ep_sent"], r0["ep_local"]))
        print(f"### {name} ({world} ranks)\n")
        print(markdown_table(["collective", "group", "calls", "counted kB", "analytic kB",
                              "counted == analytic"], comparison_rows(counted, uniform, exact)))
        if layout.ep > 1:
            print("\n(analytic kB of the all-to-alls: EP rows under uniform routing; the match "
                  "column uses the rows the dispatchers routed)")
        print()
        step = statistics.median(r0["times"])
        total = sum((s.sent for s in counted.values()), start=0)
        summary.append([name, str(world), str(r0["dp"]), f"{1e3 * step:.1f}", f"{1e3 * base:.1f}",
                        f"{step / base:.2f}", kb(total)])
    print(f"### Step time against one process on the same global batch ({args.steps} steps, "
          f"median)\n")
    print(markdown_table(["layout", "ranks", "dp", "step ms", "1 process ms",
                          "ratio (layout / 1 process)", "sent kB/rank"], summary))
    print(f"\n{machine_line()}, gloo, 1 thread per rank and for the one process; {load.note()}\n")


def _pcfg(sizes: dict, vision: str = "balanced") -> ParallelConfig:
    pcfg = ParallelConfig(**sizes)
    pcfg.vision.name = vision
    return pcfg


# The 397B config on 64 GPUs: (name, parallel sizes)
PLANS_397B = [
    ("FSDP: dp_shard=64", {"dp_shard": 64}),
    ("FSDP + EP: dp_shard=64, ep=8", {"dp_shard": 64, "ep": 8}),
    ("FSDP + EP: dp_shard=64, ep=64", {"dp_shard": 64, "ep": 64}),
    ("TP + FSDP: tp=2 x dp_shard=32", {"tp": 2, "dp_shard": 32}),
    ("TP + FSDP + EP: tp=2 x dp_shard=32, ep=8", {"tp": 2, "dp_shard": 32, "ep": 8}),
    ("HSDP + EP: dp_replicate=8 x dp_shard=8, ep=8", {"dp_replicate": 8, "dp_shard": 8, "ep": 8}),
    ("HSDP + EP: dp_replicate=2 x dp_shard=32, ep=8", {"dp_replicate": 2, "dp_shard": 32, "ep": 8}),
    ("TP + FSDP: tp=8 x dp_shard=8 (KV heads replicated)", {"tp": 8, "dp_shard": 8}),
    ("TP + FSDP + EP: tp=8 x dp_shard=8, ep=8", {"tp": 8, "dp_shard": 8, "ep": 8}),
]


def spans_nodes(layout, role: str, gpus_per_node: int) -> bool:
    """Whether rank 0's group of `role` (a parallel.layout.GROUP_AXES kind) spans several nodes of
    gpus_per_node consecutive ranks."""
    return len({r // gpus_per_node for r in layout.group(role, 0)}) > 1


def bench_397b(args) -> None:
    from model.config import ConfigError

    cfg = load_model_config("qwen35_397b_a17b")
    patches = tuple([args.image_patches] * args.images)
    spec = StepSpec(rows=1, seq_len=args.seq_len_397b, image_patches=patches, param_bytes=2,
                    reduce_bytes=4)
    print(f"## qwen35_397b_a17b on 64 GPUs: analytic (parallel/comm_model.py), GB sent per rank per "
          f"step\n\nOne micro-batch of 1 x {spec.seq_len} tokens per data-parallel rank, "
          f"{args.images} images of {args.image_patches} patches in it; bf16 params and "
          f"activations, fp32 gradient reduction; EP rows under uniform routing; grad_accum 1; no "
          f"activation checkpointing except in 'total, full AC' (every decoder layer recomputed).\n")
    rows, details = [], []
    for name, sizes in PLANS_397B:
        try:
            layout = validate_layout(_pcfg(sizes), cfg, 64, seq_len=spec.seq_len)
        except ConfigError as e:
            rows.append([name] + [""] * 8 + ["rejected: " + str(e).split(" (")[0]])
            continue
        colls = predict(cfg, layout, spec)
        src = by_source(colls)
        total = sum(src.values())
        table = to_table(colls)
        (kind, group), top = max(table.items(), key=lambda kv: kv[1].sent)
        with_ac = sum(by_source(predict(cfg, layout, replace(spec, activation_checkpoint="full"))).values())
        across = sum(c.sent_total() for c in colls if spans_nodes(layout, c.role, args.gpus_per_node))
        rows.append([name] + [gb(src.get(k, 0)) for k in ("fsdp", "tp", "ep", "vision", "trainer")]
                    + [gb(total), gb(across), gb(with_ac),
                       f"{kind} {group} ({100 * float(top.sent / total):.0f}%)"])
        details.append((name, [[k, grp, str(st.calls), gb(st.payload), gb(st.sent)]
                               for (k, grp), st in table.items()]))
    print(markdown_table(["plan", "FSDP", "TP/SP", "EP", "vision", "trainer", "total GB",
                          f"on groups spanning nodes of {args.gpus_per_node}", "total, full AC",
                          "largest"], rows))
    if args.details:
        for name, table in details:
            print(f"\n{name}\n")
            print(markdown_table(["collective", "group", "calls", "payload GB", "sent GB"], table))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_vl")
    ap.add_argument("--mtp", type=int, default=1, help="MTP depth (tiny_vl has none by default)")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout (median)")
    ap.add_argument("--layouts", nargs="*", help="names from LAYOUTS or EXTRA_LAYOUTS (default: LAYOUTS)")
    ap.add_argument("--only-397b", action="store_true")
    ap.add_argument("--seq-len-397b", type=int, default=8192)
    ap.add_argument("--images", type=int, default=4, help="images per 397B micro-batch")
    ap.add_argument("--image-patches", type=int, default=784, help="patches per image (448x448: 784)")
    ap.add_argument("--details", action="store_true", help="397B: one table per plan by collective")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    args = ap.parse_args()
    if not args.only_397b:
        bench_layouts(args)
    bench_397b(args)


if __name__ == "__main__":
    main()
