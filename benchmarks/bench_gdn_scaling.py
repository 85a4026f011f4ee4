"""Sequence-length scaling of one GatedDeltaNet layer (forward+backward), and the cost of packing.

    python benchmarks/bench_gdn_scaling.py                          # T = 2048 ... 16384, B=1
    python benchmarks/bench_gdn_scaling.py --seqlens 1024 2048 --repeats 5

Smoke-model dims by default: hidden 256, 2 key heads, 4 value heads, head dims 64, conv kernel 4.
The baseline is the same layer at the shortest length: a chunked delta rule is linear in T, so the
ratio column should track T / T_min (8x for 16k over 2k; above ~9x means super-linear work).
The packed rows run the same layer on the same number of tokens split into several documents via
cu_seqlens (state and conv window reset per document: random cut points, and one long document with
short ones) and compare with one document of that length; the ratio should be ~1.0.
All cases are timed round-robin (one call of each per round), median over rounds.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the checkout on sys.path)
import torch

from common import OtherLoad, interleaved_medians, machine_line, markdown_table
from model.config import ModelConfig
from model.context import SequenceContext, segment_layout
from model.gated_deltanet import GatedDeltaNet


def make_ctx(doc_lengths: list[int]) -> SequenceContext:
    """B=1 context over sum(doc_lengths) tokens; GatedDeltaNet reads cu_seqlens and pos_in_doc only."""
    cu = torch.tensor([0] + doc_lengths).cumsum(0)
    t = int(cu[-1])
    doc_ids, pos = segment_layout(cu, 1, t)
    return SequenceContext(cu_seqlens=cu, doc_ids=doc_ids, pos_in_doc=pos, cos=None, sin=None)


def split_lengths(total: int, docs: int, seed: int = 0) -> list[int]:
    """`docs` uneven lengths (not multiples of the chunk size) that sum to `total`."""
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: docs - 1].add(1).tolist())
    bounds = [0] + cuts + [total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def skewed_lengths(total: int, docs: int, short: int = 100) -> list[int]:
    """One long document and `docs - 1` short ones: the layout a packer makes around a long text."""
    return [total - short * (docs - 1)] + [short] * (docs - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--packed-seqlen", type=int, default=4096, help="tokens of the packed row (0 = skip)")
    p.add_argument("--docs", type=int, default=8, help="documents in the packed row")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--key-heads", type=int, default=2)
    p.add_argument("--value-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=args.hidden, linear_num_key_heads=args.key_heads,
                      linear_num_value_heads=args.value_heads, linear_key_head_dim=args.head_dim,
                      linear_value_head_dim=args.head_dim)
    layer = GatedDeltaNet(cfg)
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(std=0.02)

    gen = torch.Generator().manual_seed(0)
    t_max = max(args.seqlens + [args.packed_seqlen])
    x_all = torch.randn(1, t_max, args.hidden, generator=gen)
    dout_all = torch.randn(1, t_max, args.hidden, generator=gen)

    def case(doc_lengths):
        t = sum(doc_lengths)
        ctx = make_ctx(doc_lengths)
        x = x_all[:, :t].clone().requires_grad_()
        dout = dout_all[:, :t]

        def run():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x, ctx).backward(dout)
        return run

    cases = {f"T={t}": case([t]) for t in args.seqlens}
    packings = {}
    if args.packed_seqlen:
        packings = {"random": split_lengths(args.packed_seqlen, args.docs),
                    "skewed": skewed_lengths(args.packed_seqlen, args.docs)}
        single = f"T={args.packed_seqlen}"
        if single not in cases:
            cases[single] = case([args.packed_seqlen])
        for name, lengths in packings.items():
            cases[name] = case(lengths)
    load = OtherLoad()
    sec = interleaved_medians(cases, args.warmup, args.repeats)

    print(f"GatedDeltaNet layer fwd+bwd, fp32, B=1, hidden={args.hidden}, key heads={args.key_heads}, "
          f"value heads={args.value_heads}, head dim={args.head_dim}; {machine_line()}\n")
    base_t = min(args.seqlens)
    base = sec[f"T={base_t}"]
    rows = []
    for t in args.seqlens:
        s = sec[f"T={t}"]
        rows.append([t, 1, f"{s * 1e3:.0f}", f"{s / t * 1e6:.1f}", f"{s / base:.2f}", f"{t / base_t:.0f}"])
    print(markdown_table(["T", "docs", "fwd+bwd ms", "us/token", f"time / time(T={base_t})", "ideal (linear)"],
                         rows))
    if packings:
        t = args.packed_seqlen
        s_one = sec[f"T={t}"]
        print(f"\npacking at T={t} (same tokens, cu_seqlens); random = uneven cut points, "
              f"skewed = one long document and {args.docs - 1} of 100 tokens\n")
        rows = [["one document", 1, f"{s_one * 1e3:.0f}", f"{s_one / t * 1e6:.1f}", "1.00"]]
        for name, lengths in packings.items():
            s = sec[name]
            rows.append([f"{name} {lengths}", len(lengths), f"{s * 1e3:.0f}", f"{s / t * 1e6:.1f}",
                         f"{s / s_one:.2f}"])
        print(markdown_table(["layout (document lengths)", "docs", "fwd+bwd ms", "us/token",
                              "time / time(1 doc)"], rows))
    print(f"\n{load.note()}")


if __name__ == "__main__":
    main()
