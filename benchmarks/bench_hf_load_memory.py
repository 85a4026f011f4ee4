"""Memory of `train.init_from_hf` per rank: a synthetic Hugging Face checkpoint of ~2 GB (random
weights written tensor by tensor, no transformers) loaded under dp_shard=2; each rank's peak RSS
increase against the checkpoint's size, and the logits against a one-process load.

    python benchmarks/bench_hf_load_memory.py [--gib 2.2] [--dir /tmp/synthetic_hf] [--keep]

Steps: (1) write the checkpoint (fp32, qwen3_5_moe_text, per-expert tensors, 400 MB shards);
(2) `torchrun --nproc-per-node 2` this script with `--rank-load`: every rank builds the model on
the meta device, shards it (FSDP2 over 2 ranks), allocates its shards and fills them with
`load_hf_shards`, recording its peak RSS increase (VmHWM after resetting it, minus the RSS before)
and the bytes it read, then runs a forward; (3) one process loads the whole checkpoint
(`load_pretrained`) and runs the same forward. The baseline is what one process needs: the whole
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import ROOT, machine_line, markdown_table

import torch  # noqa: E402

IDS = torch.arange(48).remainder(1000).view(1, 48)


def synthetic_config(gib: float):
    """A qwen3_5_moe_text model whose fp32 weights take about `gib` GiB (layers scale with it)."""
    from model.config import ModelConfig

    per_layer = 32 * 3 * 1024 * 512 * 4 + 12 * 2**20 * 4   # experts + mixer/shared, ~ bytes
    fixed = 2 * 32768 * 1024 * 4
    layers = max(4, round((gib * 2**30 - fixed) / per_layer / 4) * 4)
    return ModelConfig(
        name="synthetic", vocab_size=32768, hidden_size=1024, num_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=8,
        linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        mlp_type="moe", num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
        shared_expert_intermediate_size=1024).validate()


def write_checkpoint(out: Path, gib: float, shard_bytes: int = 400 * 2**20) -> int:
    """Random fp32 weights, tensor by tensor, into safetensors shards + index + config.json."""
    from model.hf.config_map import FAMILIES, model_to_hf_config
    from model.hf.weights import expected_hf_shapes, model_rules
    from model.params import build_meta
    from train.checkpoint.hf_convert import plan_shards
    from train.checkpoint.hf_files import INDEX, SafetensorsWriter

    cfg = synthetic_config(gib)
    out.mkdir(parents=True, exist_ok=True)
    ours = {k: v.shape for k, v in build_meta(cfg).state_dict().items()}
    shapes = expected_hf_shapes(model_rules(cfg, FAMILIES["qwen3_5_moe_text"]), ours)
    keys = list(shapes)
    sizes = [shapes[k].numel() * 4 for k in keys]
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    shards = plan_shards(sizes, shard_bytes)
    for n, idx in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(out / name, [(keys[i], shapes[keys[i]], torch.float32) for i in idx])
        for i in idx:
            k = keys[i]
            t = torch.randn(shapes[k], generator=g)
            # Norm weights near 0 ((1 + w) norms), A_log / dt_bias small, matrices at init scale.
            w.write(k, t * (0.02 if t.ndim > 1 else 0.1))
            weight_map[k] = name
        w.close()
        total += w.total
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(model_to_hf_config(cfg, "qwen3_5_moe_text",
                                                                   dtype="float32"), indent=1))
    return total


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rank_load(hf_dir: Path) -> None:
    """One torchrun rank: load its shards of `hf_dir` under dp_shard=world; write its numbers."""
    import torch.distributed as dist

    from model.hf.config_map import hf_to_model_config
    from model.language_model import Qwen35LM
    from parallel.config import ParallelConfig
    from parallel.materialize import materialize, reset_all_buffers
    from parallel.mesh import build_meshes, validate_layout
    from parallel.plan import parallelize
    from train.checkpoint.hf_shards import load_hf_shards

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = hf_to_model_config(json.loads((hf_dir / "config.json").read_text()))
    before = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    with torch.device("meta"):
        model = Qwen35LM(cfg)
    pcfg = ParallelConfig(dp_shard=world)
    runner = parallelize(model, build_meshes(validate_layout(pcfg, cfg, world, seq_len=48), "cpu"),
                         pcfg, torch.device("cpu"))
    materialize(runner.model, "cpu", 0, values=False)
    reset_all_buffers(runner.model)
    stats = load_hf_shards(runner.model, hf_dir, cfg)
    peak = _peak_rss() - before
    from model.hf import logits as project_logits

    with torch.no_grad():  # the same call as the one-process side; FSDP gathers each layer
        logits = project_logits(runner.model, IDS)
    if rank == 0:
        torch.save(logits, hf_dir / "logits_dp.pt")
    (hf_dir / f"rank{rank}.json").write_text(json.dumps({**stats, "peak_rss_increase": peak}))
    dist.barrier()
    dist.destroy_process_group()


def measure(hf_dir: Path, gib: float) -> dict:
    """Write the checkpoint, load it on 2 torchrun ranks and in one process; the numbers."""
    from common import free_port_hint

    shutil.rmtree(hf_dir, ignore_errors=True)
    size = write_checkpoint(hf_dir, gib)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-addr", "127.0.0.1", "--master-port", str(free_port_hint()), __file__,
                    "--rank-load", "--dir", str(hf_dir)], env=env, check=True)
    ranks = [json.loads((hf_dir / f"rank{r}.json").read_text()) for r in range(2)]

    from model.hf import logits as project_logits
    from train.checkpoint.hf_convert import load_pretrained

    with torch.no_grad():
        whole = project_logits(load_pretrained(hf_dir), IDS)
    dp = torch.load(hf_dir / "logits_dp.pt")
    err = float((dp - whole).abs().max() / whole.abs().max())
    return {"size": size, "ranks": ranks, "logits_rel_err": err,
            "shards": len(list(hf_dir.glob("*.safetensors")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.2)
    p.add_argument("--dir", default="/tmp/synthetic_hf")
    p.add_argument("--keep", action="store_true", help="leave the checkpoint on disk")
    p.add_argument("--rank-load", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    hf_dir = Path(args.dir)
    if args.rank_load:
        return rank_load(hf_dir)
    m = measure(hf_dir, args.gib)
    size = m["size"]
    print(machine_line())
    print(f"synthetic checkpoint: {size / 2**30:.2f} GiB fp32 in {m['shards']} shards; dp_shard=2")
    rows = [[f"rank {r}", f"{s['bytes_read'] / 2**30:.2f}", f"{s['local_bytes'] / 2**30:.2f}",
             f"{s['peak_rss_increase'] / 2**30:.2f}", f"{s['peak_rss_increase'] / size:.2f}"]
            for r, s in enumerate(m["ranks"])]
    rows.append(["one process (baseline)", f"{size / 2**30:.2f}", f"{size / 2**30:.2f}", "-", "-"])
    print(markdown_table(["", "read GiB", "own shards GiB", "peak RSS increase GiB",
                          "peak / checkpoint"], rows))
    print(f"logits dp_shard=2 vs one process: max relative error {m['logits_rel_err']:.2e}")
    if not args.keep:
        shutil.rmtree(hf_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
