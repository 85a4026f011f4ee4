"""Estimated (parallel/memory.py) vs measured (parallel/memory_tracker.py) peak of one training
step in one CPU process: `python benchmarks/bench_memory.py model=tiny data.seq_len=256 ...`.
The second step is measured, so that the AdamW states exist."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallel.layout import Layout  # noqa: E402
from parallel.memory import estimate_memory, spec_from_config  # noqa: E402
from parallel.memory_tracker import LiveBytes, grads, optimizer_tensors  # noqa: E402
from train.main import load_config  # noqa: E402


def main(overrides: list[str]) -> None:
    from train.trainer import Trainer

    cfg = load_config(["experiment=smoke_cpu_text", "logging.wandb=disabled",
                       "checkpoint.interval=0", *overrides])
    tr = Trainer(cfg, Path(tempfile.mkdtemp()))
    tr.train_step()
    ps = list(tr.model.parameters())
    with LiveBytes(ps, grads(ps), optimizer_tensors(tr.optimizer), tr.model.buffers()) as mem:
        tr.train_step()
    est = estimate_memory(cfg.model, Layout(world=1), spec_from_config(cfg, "cpu"))
    print(f"{' '.join(overrides)}: measured {mem.peak / 2**20:.2f} MiB, estimated "
          f"{est.peak_bytes / 2**20:.2f} MiB ({est.peak_bytes / mem.peak:.3f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
