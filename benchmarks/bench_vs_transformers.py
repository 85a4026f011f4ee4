"""One training step of the project's model against transformers' implementation of the same model,
same weights, same batch, same process.

    python benchmarks/bench_vs_transformers.py                       # tiny and smoke, 8 x 256 tokens
    python benchmarks/bench_vs_transformers.py --configs smoke --batch 4 --seq-len 512 --repeats 10

Both sides: forward with labels (mean next-token CE; the project adds its 0.001 x Switch aux loss),
backward, AdamW step (torch defaults, foreach), grads set to None between steps, fp32, train mode.
The transformers model is `Qwen3_5MoeForCausalLM` (the text class of Qwen3.5-MoE) built from the
project model's weights through `model.hf.to_hf_state_dict`; the script first checks that both give
the same CE on the batch. MTP is turned off (transformers has no MTP head). On CPU transformers
runs its PyTorch fallbacks: `torch_chunk_gated_delta_rule` and the reference causal conv1d for
the DeltaNet, SDPA for attention, its grouped-mm experts.

Speed: steps timed round-robin (project, transformers, project, ...), median over rounds; tokens/s
= batch x seq_len / median step time. Memory: each side runs in a fresh child process (same seed,
so the same weights and batch) that builds the model and optimizer, returns freed heap to the OS
(malloc_trim), resets the kernel's peak-RSS counter (/proc/self/clear_refs), runs two steps and
reports peak RSS (VmHWM) minus the RSS before the first step: the memory a training step adds on top
of the weights, i.e. gradients + AdamW moments (equal on both sides, 3x the parameters) + the
activations kept for backward and the temporaries (where the two differ). RSS rather than
tracemalloc because tracemalloc does not see torch's tensor allocations.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import re
import subprocess
import sys

import common  # noqa: F401  (puts the checkout on sys.path)
import torch

from common import OtherLoad, interleaved_medians, machine_line, markdown_table
from model.config import load_model_config
from model.hf import to_hf_state_dict
from model.language_model import Qwen35LM


def build(config: str, side: str, batch: int, seq_len: int, seed: int = 0):
    """(model, optimizer, step function, input_ids) for side 'ours' or 'hf', same weights and batch."""
    import transformers

    cfg = dataclasses.replace(load_model_config(config), mtp_num_layers=0)
    torch.manual_seed(seed)
    ours = Qwen35LM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    if side == "ours":
        model = ours.train()

        def loss_fn():
            return model(ids, labels=labels).loss
    else:
        hf_config, state = to_hf_state_dict(ours, "qwen3_5_moe_text", fused_experts=True)
        model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**hf_config))
        model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
        model.float().train()
        del ours, state

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, opt, step, ids, labels


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def memory_child(config: str, side: str, batch: int, seq_len: int) -> None:
    model, opt, step, _, _ = build(config, side, batch, seq_len)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        step()
    print(json.dumps({"step_mib": (_rss_kib("VmHWM") - base) / 1024, "base_mib": base / 1024}))


def measure_memory(config: str, side: str, batch: int, seq_len: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", config, side, "--batch", str(batch),
                          "--seq-len", str(seq_len)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "smoke"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.batch, args.seq_len)
        return

    load = OtherLoad()
    rows, timings = [], {}
    tokens = args.batch * args.seq_len
    for config in args.configs:
        ours, _, ours_step, ids, labels = build(config, "ours", args.batch, args.seq_len)
        hf, _, hf_step, _, _ = build(config, "hf", args.batch, args.seq_len)
        with torch.no_grad():
            ce_ours = float(ours(ids, labels=labels).ce)
            ce_hf = float(hf(input_ids=ids, labels=ids).loss)
        if abs(ce_ours - ce_hf) > 1e-4 * abs(ce_hf):
            raise SystemExit(f"{config}: the two models disagree before training: CE {ce_ours} vs {ce_hf}")
        timings[config] = (interleaved_medians({"ours": ours_step, "hf": hf_step}, warmup=args.warmup,
                                               repeats=args.repeats),
                           sum(q.numel() for q in ours.parameters()))
        del ours, hf
        gc.collect()
    # Noted before the memory runs: their child processes would count as other load.
    load_note = load.note()
    for config, (t, params) in timings.items():
        row = [config, f"{params / 1e6:.1f}M", f"{args.batch}x{args.seq_len}", f"{t['hf'] * 1e3:.0f}",
               f"{t['ours'] * 1e3:.0f}", f"{tokens / t['hf']:.0f}", f"{tokens / t['ours']:.0f}",
               f"{t['hf'] / t['ours']:.2f}"]
        if not args.no_memory:
            mem = {side: measure_memory(config, side, args.batch, args.seq_len) for side in ("ours", "hf")}
            row += [f"{mem['hf']['step_mib']:.0f}", f"{mem['ours']['step_mib']:.0f}",
                    f"{mem['hf']['step_mib'] / max(mem['ours']['step_mib'], 1e-9):.2f}"]
        rows.append(row)
    headers = ["config", "params", "batch", "transformers ms", "project ms", "transformers tok/s",
               "project tok/s", "speed-up"]
    if not args.no_memory:
        headers += ["transformers step MiB", "project step MiB", "memory ratio (hf/ours)"]
    print(f"one training step (fwd + bwd + AdamW), fp32, CE checked equal before timing; {machine_line()}\n")
    print(markdown_table(headers, rows))
    print(f"\n{load_note} (timed part)")


if __name__ == "__main__":
    main()
