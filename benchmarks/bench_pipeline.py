"""Pipeline schedules on CPU: the measured bubble of each schedule against its theoretical value,
and the step time against one process running the same micro-batches.

    python benchmarks/bench_pipeline.py                          # pp=2, m = 2, 4, 8, all schedules
    python benchmarks/bench_pipeline.py --microbatches 4 --schedules 1f1b interleaved_1f1b

Per case, pp gloo ranks (one thread each) build the same model, split it with
parallel/pipeline.py's `build_pipeline` and run `--steps` timed steps (after one warmup) of
forward + backward over m micro-batches. Each stage's compute actions (forward, backward, and the
zero-bubble schedules' weight backward) are timed (`PipelineRunner.timing`); per rank,

    bubble = 1 - (time in its compute actions) / (step time)

i.e. the share of the step a rank spends waiting for its neighbours (P2P transfers included).
Theory, for p ranks, m micro-batches, v stages per rank and equal stage times:
GPipe and 1F1B (p-1)/(m+p-1); interleaved 1F1B (p-1)/(v*m+p-1); the zero-bubble schedules fill the
bubble with deferred weight gradients ("~0" when forward = input backward = weight backward).
The baseline is one process (one thread) accumulating the same m micro-batches through the whole
model: the speedup column is its step time over the pipeline's (ideal: p / (1 + bubble)).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
from common import OtherLoad, machine_line, markdown_table

import torch
import torch.distributed as dist

from data.packing import random_batch
from model.config import load_model_config
from model.language_model import Qwen35LM
from parallel.config import ParallelConfig
from parallel.mesh import build_meshes, validate_layout
from parallel.pipeline import build_pipeline

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_zb", 2), ("zbv", 2)]
INPUTS = ("input_ids", "labels", "position_ids", "cu_seqlens")


def text_batch(seed: int, rows: int, seq_len: int, vocab: int) -> dict:
    """Rows packed (as the loader packs them) with random documents of 16-95 tokens."""
    return random_batch(seed, rows, seq_len, vocab, doc_len=(16, 96))


def build_model(args) -> Qwen35LM:
    cfg = load_model_config(args.model)
    cfg.num_layers = args.layers
    cfg.mtp_num_layers = 0
    torch.manual_seed(0)
    return Qwen35LM(cfg)


def run_rank(rank: int, world: int, args, schedule: str, virtual: int, m: int, out: str) -> None:
    model = build_model(args)
    pcfg = ParallelConfig(pp=world, pp_schedule=schedule, pp_virtual_stages=virtual, pp_microbatches=m)
    meshes = build_meshes(validate_layout(pcfg, model.cfg, world, args.seq_len), "cpu")
    runner = build_pipeline(model, meshes, pcfg, torch.device("cpu"), m)
    del model
    runner.timing = True
    batches = [text_batch(i, args.rows, args.seq_len, runner.cfg.vocab_size) for i in range(m)]
    total = sum(b["num_tokens"] for b in batches)
    steps = []
    for i in range(args.steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        runner.step(batches, total)
        wall = time.perf_counter() - t0
        for p in runner.model.parameters():
            p.grad = None
        if i:  # the first step builds the schedule
            t = runner.times
            steps.append({"wall": wall, "step": t.step_s, "busy": t.busy_s})
    Path(out, f"rank{rank}.json").write_text(json.dumps(steps))


def _entry(rank: int, world: int, port: int, args, case: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_rank(rank, world, args, *case, out)
    finally:
        dist.destroy_process_group()


def spawn_case(args, schedule: str, virtual: int, m: int) -> list[list[dict]]:
    import torch.multiprocessing as mp

    from common import free_port_hint

    port = free_port_hint()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(args.pp, port, args, (schedule, virtual, m), out), nprocs=args.pp, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.pp)]


def baseline_step(args, m: int) -> float:
    """One process, one thread: the m micro-batches accumulated through the whole model."""
    torch.set_num_threads(1)
    model = build_model(args)
    batches = [text_batch(i, args.rows, args.seq_len, model.cfg.vocab_size) for i in range(m)]
    total = sum(b["num_tokens"] for b in batches)
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        for b in batches:
            out = model(**{k: b[k] for k in INPUTS})
            (out.loss * b["num_tokens"] / total).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def theory(schedule: str, p: int, m: int, v: int) -> str:
    if schedule in ("gpipe", "1f1b"):
        return f"{(p - 1) / (m + p - 1):.3f}"
    if schedule == "interleaved_1f1b":
        return f"{(p - 1) / (v * m + p - 1):.3f}"
    return "~0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (divisible by pp * 2)")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--schedules", nargs="+", default=[s for s, _ in SCHEDULES])
    args = ap.parse_args()
    load = OtherLoad()
    rows = []
    for m in args.microbatches:
        base = baseline_step(args, m)
        for schedule, v in SCHEDULES:
            if schedule not in args.schedules:
                continue
            per_rank = spawn_case(args, schedule, v, m)
            # Median over steps of each rank's own numbers; the step time is the slowest rank's.
            step = statistics.median(max(r[i]["step"] for r in per_rank) for i in range(args.steps))
            bubbles = [statistics.median(1 - s["busy"] / s["step"] for s in r) for r in per_rank]
            busy = [statistics.median(s["busy"] for s in r) for r in per_rank]
            rows.append([schedule, v, m, theory(schedule, args.pp, m, v),
                         f"{statistics.mean(bubbles):.3f}", " / ".join(f"{b:.3f}" for b in bubbles),
                         " / ".join(f"{b * 1e3:.0f}" for b in busy), f"{step * 1e3:.0f}",
                         f"{base * 1e3:.0f}", f"{base / step:.2f}x"])
            print(f"done {schedule} v={v} m={m}", flush=True)
    print(machine_line())
    print(f"model {args.model} with {args.layers} layers, pp={args.pp}, micro-batch {args.rows} x "
          f"{args.seq_len} tokens, fp32, median of {args.steps} steps")
    print(markdown_table(["schedule", "v", "m", "bubble theory", "bubble measured", "per rank",
                          "compute ms per rank", "step ms", "1 process ms", "speedup"], rows))
    print(load.note())


if __name__ == "__main__":
    main()
