"""Step-time cost of a checkpoint save: synchronous against asynchronous (checkpoint.async=true).

    python benchmarks/bench_checkpoint.py [--model smoke] [--rounds 3] [--steps 12] [--every 4]

One process trains the same model with the trainer's own calls (`train_step`, `save`). Per round,
three blocks of `--steps` steps run one after another: without saves (the baseline), saving every
`--every` steps synchronously, and saving every `--every` steps asynchronously (the block ends with
the wait for the last save, so no write is left out). The cost of a save is (block - baseline) /
saves; the table gives the medians over rounds, plus the async save's blocking part (staging the
state into host memory) and the size of one checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import OtherLoad, machine_line, markdown_table


def make(run: Path, model: str, async_save: bool):
    from train.main import load_config
    from train.trainer import Trainer

    cfg = load_config(["experiment=smoke_cpu_text", f"model={model}", "train.device=cpu",
                       "train.autocast=none", "logging.wandb=disabled", "data.seq_len=256",
                       "data.batch_size=2", "train.peak_flops=1e12", "checkpoint.keep_last=1",
                       f"checkpoint.async={'true' if async_save else 'false'}", f"run_dir={run}",
                       "train.max_steps=100000"])
    t = Trainer(cfg, run)
    t.restore()
    return t


def block(t, steps: int, every: int) -> tuple[float, list[float]]:
    """Wall seconds of `steps` steps saving every `every` (0: never); the blocking part of each save."""
    blocked = []
    start = time.perf_counter()
    for i in range(1, steps + 1):
        t.train_step()
        if every and i % every == 0:
            s = time.perf_counter()
            t.save()
            blocked.append(time.perf_counter() - s)
    if t.async_ckpt is not None:
        t.async_ckpt.wait()
    return time.perf_counter() - start, blocked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smoke")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    args = p.parse_args()
    load = OtherLoad()
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        sync, background = make(root / "sync", args.model, False), make(root / "async", args.model, True)
        block(sync, 2, 0)
        block(background, 2, 0)  # warm-up
        saves = args.steps // args.every
        base, cost_sync, cost_async, stage, write_sync = [], [], [], [], []
        for _ in range(args.rounds):
            b, _ = block(sync, args.steps, 0)
            s, s_blocked = block(sync, args.steps, args.every)
            a, a_blocked = block(background, args.steps, args.every)
            base.append(b / args.steps)
            cost_sync.append((s - b) / saves)
            cost_async.append((a - b) / saves)
            write_sync += s_blocked
            stage += a_blocked
        size = sum(f.stat().st_size for f in (root / "sync" / "checkpoints").rglob("*") if f.is_file())
        med = statistics.median
        print(machine_line())
        print(f"model={args.model}: {sum(p.numel() for p in sync.model.parameters()) / 1e6:.2f}M "
              f"parameters; checkpoint {size / 2**20:.0f} MiB (model + AdamW state); "
              f"{args.rounds} rounds of {args.steps} steps, a save every {args.every}")
        rows = [["no save (baseline)", f"{med(base):.3f}", "-", "-", "-"],
                ["sync save", f"{med(base):.3f}", f"{med(cost_sync):.3f}", f"{med(write_sync):.3f}",
                 f"{med(cost_sync) / med(base):.2f}"],
                ["async save", f"{med(base):.3f}", f"{med(cost_async):.3f}", f"{med(stage):.3f}",
                 f"{med(cost_async) / med(base):.2f}"]]
        print(markdown_table(["mode", "step s", "cost per save s", "blocking call s",
                              "cost in steps"], rows))
        print(f"async / sync cost per save: {med(cost_async) / med(cost_sync):.2f}")
        print(load.note())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
