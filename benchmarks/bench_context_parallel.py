"""Bytes one rank sends for context parallelism, per layer, against the sequence length T:
one Gated DeltaNet layer and one gated-attention layer of the smoke model (fp32), forward and
backward on its slice of one document of T tokens spanning every rank, under the collective
counter (parallel/comm_count.py). The DeltaNet's traffic (the conv halo and the [S0 | M] state
summaries) should not grow with T; attention's (the K/V all-gather) grows linearly.

    python benchmarks/bench_context_parallel.py --cp 2 4096 16384 32768
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import timedelta

from common import ROOT  # noqa: F401  (puts the checkout on sys.path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from model.attention import GatedAttention  # noqa: E402
from model.config import load_model_config  # noqa: E402
from model.gated_deltanet import GatedDeltaNet  # noqa: E402
from model.language_model import split_micro_batch  # noqa: E402
from model.rope import RotaryEmbedding  # noqa: E402
from parallel.comm_count import CommCounter  # noqa: E402
from parallel.context_parallel import GroupComm  # noqa: E402


def layer_bytes(layer, ctx, length: int, hidden: int) -> tuple[int, int]:
    """(calls, bytes sent) of one forward + backward of `layer` on this rank's slice."""
    x = torch.randn(1, length, hidden, requires_grad=True)
    counter = CommCounter({dist.group.WORLD.group_name: "cp"})
    with counter:
        layer(x, ctx).sum().backward()
    stats = counter.table().values()
    return sum(s.calls for s in stats), int(sum(s.sent for s in stats))


def worker(rank: int, world: int, store: str, lengths: list[int], out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=1800))
    cfg = load_model_config("smoke")
    torch.manual_seed(0)
    gdn, attn = GatedDeltaNet(cfg), GatedAttention(cfg)
    rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.resolved_mrope_section())
    comm = GroupComm(dist.group.WORLD)
    rows = []
    for t in lengths:
        ids = torch.zeros(1, t, dtype=torch.long)
        part = split_micro_batch(cfg, rotary, comm, ids, None, None, None)
        g = layer_bytes(gdn, part.ctx, part.length, cfg.hidden_size)
        a = layer_bytes(attn, part.ctx, part.length, cfg.hidden_size)
        rows.append(f"| {t} | {world} | {g[0]} | {g[1] / 1e3:.1f} | {a[0]} | {a[1] / 1e3:.1f} |")
    if rank == world - 1:  # the last rank: its attention reads every earlier rank's keys
        with open(out, "w") as f:
            f.write("\n".join(rows) + "\n")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("lengths", type=int, nargs="*", default=[4096, 16384])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows")
        mp.start_processes(worker, args=(args.cp, os.path.join(d, "store"), args.lengths, out),
                           nprocs=args.cp, join=True, start_method="fork")
        print(f"torch {torch.__version__}; smoke model (fp32), one document of T tokens; bytes sent "
              f"by the last rank per layer, forward + backward")
        print("| T | cp | GDN collectives | GDN kB sent | attention collectives | attention kB sent |")
        print("|---|---|---|---|---|---|")
        print(open(out).read(), end="")


if __name__ == "__main__":
    main()
