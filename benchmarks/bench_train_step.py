"""Throughput and MFU of the smoke config's training step, against a dense Transformer baseline.

    python benchmarks/bench_train_step.py                   # experiment=smoke_cpu_text, 3 warmup + 10 timed steps
    python benchmarks/bench_train_step.py --repeats 10 --override data.batch_size=4

Project side: `Trainer(cfg).train_step()` exactly as `fit()` calls it (loader, forward, loss,
backward, clip, AdamW, expert-load metrics). Baseline, same process, same data stream, same optimizer
settings: a plain pre-norm decoder (causal SDPA attention with the smoke model's heads, SwiGLU MLP,
RMSNorm, untied LM head) with as many layers as the smoke model, its MLP width chosen so that its
non-embedding parameter count equals the smoke model's *active* non-embedding count (MTP included).
Both steps are timed round-robin, median over rounds.

FLOPs/token come from `model.params.train_flops_per_token` (and the same 6N + attention rule for the
baseline); MFU = FLOPs/token x tokens/s / peak, with the peak being the best fp32 1024^3 matmul
rate measured in this process (`train.metrics.measure_matmul_flops`), as the trainer does on CPU.
"""

from __future__ import annotations

import argparse
import tempfile

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F
from torch import nn

from common import OtherLoad, interleaved_medians, machine_line, markdown_table
from data.loader import build_loader
from model.mlp import SwiGLU
from model.params import count_params
from train.main import load_config
from train.metrics import measure_matmul_flops
from train.optim import build_optimizer
from train.trainer import Trainer


class DenseBlock(nn.Module):
    """x [B, T, D] -> [B, T, D]: x + Attn(norm(x)), then + SwiGLU(norm(.)). No RoPE (negligible FLOPs)."""

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.mlp_norm(x))


class DenseLM(nn.Module):
    """input_ids [B, T], labels [B, T] (shifted, -100 = ignore) -> mean CE loss."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DenseBlock(dim, heads, head_dim, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h)).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def dense_hidden_for(target: int, dim: int, layers: int, heads: int, head_dim: int) -> int:
    """SwiGLU width (multiple of 8) giving `layers` dense blocks + final norm ~`target` parameters."""
    fixed = layers * (4 * dim * heads * head_dim + 2 * dim) + dim
    return max(8, round((target - fixed) / (layers * 3 * dim) / 8) * 8)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first")
    p.add_argument("--repeats", type=int, default=10, help="timed steps of each model")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides, e.g. data.batch_size=4")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(["experiment=smoke_cpu_text", "logging.wandb=disabled", "checkpoint.interval=0",
                           "checkpoint.save_final=false", f"run_dir={run_dir}", *args.override])
        trainer = Trainer(cfg, run_dir)
        m = cfg.model
        counts = count_params(trainer.model)
        ours_flops = trainer.flops_per_token

        # Baseline sized to the smoke model's active non-embedding parameters.
        target = counts.active - counts.embedding
        hidden = dense_hidden_for(target, m.hidden_size, m.num_layers, m.num_attention_heads, m.head_dim)
        torch.manual_seed(cfg.train.seed)
        dense = DenseLM(m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads, m.head_dim,
                        hidden).to(trainer.device)
        dense_params = sum(p.numel() for p in dense.parameters())
        dense_nonemb = dense_params - dense.embed_tokens.weight.numel() - dense.lm_head.weight.numel()
        # train_flops_per_token's (Megatron-Bridge's) convention: 2 per matmul parameter (LM head included),
        # causal attention 2 * H * head_dim * T per layer, backward = 2 x forward
        dense_flops = 3.0 * (2.0 * (dense_nonemb + dense.lm_head.weight.numel())
                             + m.num_layers * 2.0 * m.num_attention_heads * m.head_dim * cfg.data.seq_len)
        dense_opt = build_optimizer(dense, cfg.train)
        dense_loader = build_loader(cfg.data)  # a second copy of the same stream

        def dense_step():
            b = next(dense_loader)
            dense_opt.zero_grad(set_to_none=True)
            loss = dense(b["input_ids"].to(trainer.device), b["labels"].to(trainer.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dense.parameters(), cfg.train.grad_clip, foreach=True)
            dense_opt.step()

        load = OtherLoad()
        sec = interleaved_medians({"ours": trainer.train_step, "dense": dense_step}, args.warmup, args.repeats)
        # Best-of matmul rate; measured after the steps as well, so a busy moment cannot lower it.
        peak = max(trainer.peak_flops, measure_matmul_flops(trainer.device, torch.float32, seconds=1.0))

    tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
    print(f"train step, experiment=smoke_cpu_text (B={cfg.data.batch_size} T={cfg.data.seq_len}, fp32, "
          f"{trainer.device}); {machine_line()}")
    print(f"measured fp32 matmul peak (1024^3, best of): {peak / 1e9:.1f} GFLOP/s\n")
    rows = []
    for name, s, flops, total, active in (
            (f"smoke Qwen3.5 (MoE {m.num_experts}e top-{m.num_experts_per_tok}, MTP)", sec["ours"], ours_flops,
             counts.total, counts.active - counts.embedding),
            (f"dense baseline (SwiGLU {hidden})", sec["dense"], dense_flops, dense_params, dense_nonemb)):
        tps = tokens / s
        rows.append([name, f"{total / 1e6:.2f}", f"{active / 1e6:.2f}", f"{s * 1e3:.0f}", f"{tps:,.0f}",
                     f"{flops / 1e6:.1f}", f"{100 * flops * tps / peak:.1f}", f"{sec['dense'] / s:.2f}"])
    print(markdown_table(["model", "params M", "active non-emb M", "step ms", "tokens/s", "MFLOPs/token",
                          "MFU %", "speed vs dense"], rows))
    print(f"\n{load.note()}")


if __name__ == "__main__":
    main()
