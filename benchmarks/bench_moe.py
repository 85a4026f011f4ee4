"""Forward+backward time of the MoE block: the project's SparseMoE (expert-sorted tokens, two grouped
GEMMs) against a Python loop over experts (Hugging Face's eager `Qwen3_5MoeExperts` loop: index each
expert's tokens, two matmuls, scale, index_add), on the same weights and inputs, same process.

    python benchmarks/bench_moe.py                                   # default grid, N=4096 tokens
    python benchmarks/bench_moe.py --configs 512x64x8 --repeats 10   # hidden x experts x top-k

The shared expert is off (shared_expert_intermediate_size=0) so that both sides compute only the
router and the routed experts. Before timing, the two outputs and input gradients are checked with
allclose. The speed-up column is loop time / grouped time (higher = grouped faster).
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F

from common import OtherLoad, interleaved_medians, machine_line, markdown_table
from model.config import ModelConfig
from model.context import SequenceContext, segment_layout
from model.moe import SparseMoE


def make_ctx(n: int) -> SequenceContext:
    """SparseMoE reads the context only to add its auxiliary losses: one document of n tokens."""
    cu = torch.tensor([0, n])
    doc_ids, pos = segment_layout(cu, 1, n)
    return SequenceContext(cu_seqlens=cu, doc_ids=doc_ids, pos_in_doc=pos, cos=None, sin=None)


def loop_moe(moe: SparseMoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """The baseline: the same router math, then a Python loop over the experts that were hit, as in
    transformers' eager Qwen3_5MoeExperts.forward. x [B, T, D] -> [B, T, D]."""
    shape = x_BTD.shape
    x = x_BTD.reshape(-1, shape[-1])
    probs = F.linear(x.float(), moe.gate.weight.float()).softmax(dim=-1)
    weights, idx = probs.topk(moe.top_k, dim=-1)
    if moe.gate.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    w_gu, w_d = moe.experts.gate_up_proj, moe.experts.down_proj
    out = torch.zeros_like(x)
    with torch.no_grad():
        expert_mask = F.one_hot(idx, num_classes=moe.num_experts).permute(2, 1, 0)  # [E, k, N]
        expert_hit = (expert_mask.sum(dim=(-1, -2)) > 0).nonzero()
    for e in expert_hit:
        e = e[0]
        slot, tok = torch.where(expert_mask[e])
        gate, up = F.linear(x[tok], w_gu[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_d[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out.view(shape)


def parse_config(s: str) -> tuple[int, int, int]:
    d, e, k = (int(v) for v in s.lower().split("x"))
    return d, e, k


def bench_one(tokens: int, dim: int, experts: int, top_k: int, hidden: int, warmup: int,
              repeats: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=dim, num_experts=experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=hidden, shared_expert_intermediate_size=0)
    moe = SparseMoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.02)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, tokens, dim, generator=gen)
    dout = torch.randn(1, tokens, dim, generator=gen)
    x = x0.clone().requires_grad_()

    def grouped():
        x.grad = None
        moe.zero_grad(set_to_none=True)
        out = moe(x, make_ctx(tokens))
        out.backward(dout)
        return out

    def loop():
        x.grad = None
        moe.zero_grad(set_to_none=True)
        out = loop_moe(moe, x)
        out.backward(dout)
        return out

    # Honesty check: same function, same gradients (input and expert weights).
    out_g = grouped().detach()
    gx_g, gw_g = x.grad.clone(), moe.experts.gate_up_proj.grad.clone()
    out_l = loop().detach()
    gx_l, gw_l = x.grad.clone(), moe.experts.gate_up_proj.grad.clone()
    for name, a, b in (("output", out_g, out_l), ("dx", gx_g, gx_l), ("d gate_up_proj", gw_g, gw_l)):
        scale = b.abs().max().item()
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-12)):
            raise AssertionError(f"{name}: grouped and loop differ, max |diff| "
                                 f"{(a - b).abs().max().item():.3e} (max |loop| {scale:.3e})")
    err = (out_g - out_l).abs().max().item()

    t = interleaved_medians({"loop": loop, "grouped": grouped}, warmup, repeats)
    with torch.no_grad():
        hit = int((torch.bincount(moe.gate(x0.view(-1, dim))[2].flatten(), minlength=experts) > 0).sum())
    return dict(dim=dim, experts=experts, top_k=top_k, hit=hit, loop=t["loop"], grouped=t["grouped"],
                err=err)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (B*T)")
    p.add_argument("--expert-hidden", type=int, default=256, help="moe_intermediate_size")
    p.add_argument("--configs", nargs="+", default=["256x8x2", "512x8x2", "512x32x8", "512x64x8", "256x64x2"],
                   help="hidden x experts x top-k")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    print(f"MoE block fwd+bwd, fp32, tokens={args.tokens}, expert hidden={args.expert_hidden}, "
          f"no shared expert; {machine_line()}\n")
    load = OtherLoad()
    rows = []
    for c in args.configs:
        d, e, k = parse_config(c)
        r = bench_one(args.tokens, d, e, k, args.expert_hidden, args.warmup, args.repeats)
        rows.append([d, e, k, r["hit"], f"{r['loop'] * 1e3:.1f}", f"{r['grouped'] * 1e3:.1f}",
                     f"{r['loop'] / r['grouped']:.2f}", f"{r['err']:.1e}"])
    print(markdown_table(["hidden", "experts", "top-k", "experts hit", "loop ms", "grouped ms",
                          "speed-up (loop/grouped)", "max abs diff"], rows))
    print(f"\n{load.note()}")


if __name__ == "__main__":
    main()
