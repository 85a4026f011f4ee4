"""Peak live bytes and time of one gated-attention layer (the smoke model's: 4 heads, 2 KV heads,
head_dim 64, fp32) forward + backward on one packed row of T tokens, through the attention seam
(`sdpa`: one causal call per document or block of short documents) against the dense [1,1,T,T]
mask the model used before (baseline). Documents: T/2, T/4, then 1024-token ones.

    python benchmarks/bench_attention_memory.py 8192 16384 32768
"""

from __future__ import annotations

import sys
import time

from common import ROOT  # noqa: F401  (puts the checkout on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import attention as attention_module  # noqa: E402
from model.attention import GatedAttention  # noqa: E402
from model.config import load_model_config  # noqa: E402
from model.context import SequenceContext, segment_layout  # noqa: E402
from model.rope import RotaryEmbedding  # noqa: E402
from parallel.memory_tracker import LiveBytes  # noqa: E402


def dense_mask_attention(q, k, v, cu_seqlens, causal=True, q_start=0, backend=None):
    """The old path: one SDPA call with the T x T causal block-diagonal mask."""
    t = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens[1:] - cu_seqlens[:-1])
    mask = (doc[:, None] == doc[None]) & torch.ones(t, t, dtype=torch.bool).tril()
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask[None, None],
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def lengths_for(t: int) -> list[int]:
    out = [t // 2, t // 4]
    rest = t - sum(out)
    out += [1024] * (rest // 1024)
    if rest % 1024:
        out.append(rest % 1024)
    return out


def run(t: int, dense: bool) -> tuple[float, float]:
    cfg = load_model_config("smoke")
    torch.manual_seed(0)
    layer = GatedAttention(cfg)
    rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.resolved_mrope_section())
    cu = torch.tensor([0, *torch.tensor(lengths_for(t)).cumsum(0).tolist()])
    doc_ids, pos = segment_layout(cu, 1, t)
    cos, sin = rotary(pos)
    ctx = SequenceContext(cu_seqlens=cu, doc_ids=doc_ids, pos_in_doc=pos, cos=cos, sin=sin)
    x = torch.randn(1, t, cfg.hidden_size, requires_grad=True)
    seam = attention_module.packed_attention
    attention_module.packed_attention = dense_mask_attention if dense else seam
    try:
        start = time.perf_counter()
        with LiveBytes(layer.parameters(), [x, cos, sin]) as mem:
            layer(x, ctx).sum().backward()
        return mem.peak / 2**30, time.perf_counter() - start
    finally:
        attention_module.packed_attention = seam


def main(lengths: list[int]) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| T | documents | dense mask peak GiB | per-document peak GiB | dense s | per-document s |")
    print("|---|---|---|---|---|---|")
    for t in lengths:
        doc_peak, doc_s = run(t, dense=False)
        dense_peak, dense_s = run(t, dense=True)
        print(f"| {t} | {len(lengths_for(t))} | {dense_peak:.2f} | {doc_peak:.2f} | {dense_s:.1f} | {doc_s:.1f} |",
              flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [4096, 8192])
