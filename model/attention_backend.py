"""The attention seam: every packed attention of the model (decoder and ViT) goes through
`packed_attention`, which runs one of three backends (`model.attn_backend`):

- `sdpa`: one causal SDPA call per document, or per block of short documents (a block-local mask
  of at most BLOCK_TOKENS^2); never a T x T mask across documents. Memory O(sum of document
  lengths^2) at worst, O(T) for the kernel's own tiles on CPU and with flash on CUDA.
- `flex`: flex_attention with a document-causal block mask built from the document ids (compiled
  on CUDA; in eager mode, as on CPU, it materialises the scores, has no backward in torch 2.13 and
  serves only as a forward check).
- `varlen`: torch.nn.attention.varlen (flash attention over cu_seqlens) on CUDA for fp16/bf16;
  other dtypes, or a torch without it, take flex.
- `auto`: varlen on CUDA, sdpa elsewhere.

Layout: the token stream is flat. k, v hold keys for global token indices [0, Nk); q holds the
queries of global indices [q_start, q_start + Nq) (q_start > 0 under context parallelism, where
the keys are all-gathered and the queries are this rank's slice). cu_seqlens [N+1] are document
boundaries over the key stream. Causal: query i sees key j iff j <= i and both lie in one document.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from model.config import ATTN_BACKENDS as BACKENDS

# Short documents share one SDPA call up to this many query tokens (mask BLOCK^2 bools at most).
BLOCK_TOKENS = 512
# A masked block (a document cut by a context-parallel boundary) runs this many query rows per
# call, bounding its mask to Q_CHUNK x keys.
Q_CHUNK = 2048


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attn_backend={name!r} must be one of {BACKENDS}")
    if name == "auto":
        return "varlen" if device.type == "cuda" else "sdpa"
    return name


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens,
                     causal: bool = True, q_start: int = 0, backend: str = "auto",
                     scale: Optional[float] = None) -> torch.Tensor:
    """q [Nq, H, D], k, v [Nk, Hkv, D] (Hkv divides H: GQA), cu_seqlens [N+1] (tensor or ints)
    over the keys -> [Nq, H, D]. Non-causal attention (the ViT) needs q_start == 0, Nq == Nk."""
    nq = q.shape[0]
    if nq == 0:  # nothing to attend: an empty result that keeps the projections in the graph
        return q + (k.sum() + v.sum()) * 0
    backend = resolve_backend(backend, q.device)
    bounds = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    if not causal and (q_start != 0 or nq != k.shape[0]):
        raise ValueError("non-causal packed attention needs the queries of every key (q_start=0)")
    if backend == "varlen":
        out = _varlen(q, k, v, bounds, causal, q_start, scale)
        if out is not None:
            return out
        backend = "flex"
    if backend == "flex":
        return _flex(q, k, v, bounds, causal, q_start, scale)
    if causal:
        return _sdpa_causal(q, k, v, bounds, q_start, scale)
    return _sdpa_full(q, k, v, bounds, scale)


def _sdpa(q, k, v, mask=None, causal=False, scale=None) -> torch.Tensor:
    """[L, H, D] tensors -> [Lq, H, D] through one SDPA call."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


def query_documents(bounds: list[int], q_start: int, q_end: int) -> list[tuple[int, int]]:
    """(start, end) of the documents holding queries [q_start, q_end), in order."""
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > q_start and a < q_end and b > a]


def _blocks(docs: list[tuple[int, int]], q_start: int, q_end: int) -> list[list[tuple[int, int]]]:
    """Consecutive documents grouped while their queries fit BLOCK_TOKENS (a longer one alone)."""
    blocks, cur, size = [], [], 0
    for a, b in docs:
        n = min(b, q_end) - max(a, q_start)
        if cur and size + n > BLOCK_TOKENS:
            blocks.append(cur)
            cur, size = [], 0
        cur.append((a, b))
        size += n
    if cur:
        blocks.append(cur)
    return blocks


def _sdpa_causal(q, k, v, bounds, q_start, scale) -> torch.Tensor:
    q_end = q_start + q.shape[0]
    outs = []
    for block in _blocks(query_documents(bounds, q_start, q_end), q_start, q_end):
        ks = block[0][0]                         # keys from the first document's start
        qs, qe = max(ks, q_start), min(block[-1][1], q_end)
        if len(block) == 1 and qs == ks:         # one whole document prefix: no mask at all
            outs.append(_sdpa(q[qs - q_start:qe - q_start], k[ks:qe], v[ks:qe], causal=True, scale=scale))
            continue
        # Block-local document ids of the keys [ks, qe) and the queries [qs, qe).
        lengths = torch.tensor([min(b, qe) - a for a, b in block], device=q.device)
        doc_k = torch.repeat_interleave(torch.arange(len(block), device=q.device), lengths)
        pos_k = torch.arange(ks, qe, device=q.device)
        for c in range(qs, qe, Q_CHUNK):
            ce = min(c + Q_CHUNK, qe)
            doc_q, pos_q = doc_k[c - ks:ce - ks], pos_k[c - ks:ce - ks]
            # Keys after this chunk's last query are never visible: cut them off.
            mask = (doc_q[:, None] == doc_k[None, :ce - ks]) & (pos_k[None, :ce - ks] <= pos_q[:, None])
            outs.append(_sdpa(q[c - q_start:ce - q_start], k[ks:ce], v[ks:ce], mask=mask, scale=scale))
    return torch.cat(outs)


def _sdpa_full(q, k, v, bounds, scale) -> torch.Tensor:
    """Full attention inside each segment; segments of equal length run as one batched call (the
    frames of a video, a batch of same-size images): no padding, no N x N mask."""
    n, h, d = q.shape
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def batched(idx, L):
        qb, kb, vb = (x[idx].view(-1, L, x.shape[1], d).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=h != k.shape[1])
        return o.transpose(1, 2).reshape(-1, h, d)

    if len(set(lengths)) == 1:  # the common case needs no gather
        return batched(slice(None), lengths[0])
    out = q.new_empty(n, h, d)
    starts = torch.tensor(bounds[:-1], device=q.device)
    length_t = torch.tensor(lengths, device=q.device)
    for L in sorted(set(lengths) - {0}):
        idx = (starts[length_t == L, None] + torch.arange(L, device=q.device)).flatten()
        out[idx] = batched(idx, L)
    return out


_compiled_flex = None


def _flex(q, k, v, bounds, causal, q_start, scale) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    block_mask = _flex_block_mask(tuple(bounds), causal, q_start, q.shape[0], k.shape[0], q.device)
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        fn = _compiled_flex
    out = fn(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
             v.transpose(0, 1).unsqueeze(0), block_mask=block_mask, scale=scale,
             enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


# Built once per batch layout, not once per layer: every layer of a forward (and its recompute)
# attends over the same documents. A few layouts are kept (micro-batches, MTP, the ViT).
@functools.lru_cache(maxsize=8)
def _flex_block_mask(bounds: tuple[int, ...], causal: bool, q_start: int, nq: int, nk: int,
                     device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=nk)
    doc_q = doc[q_start:q_start + nq]

    def mask_mod(b, h, qi, ki):
        same = doc_q[qi] == doc[ki]
        return same & (ki <= qi + q_start) if causal else same

    return create_block_mask(mask_mod, None, None, nq, nk, device=device)


@functools.lru_cache(maxsize=8)
def _varlen_plan(bounds: tuple[int, ...], q_start: int, q_end: int, device: torch.device):
    """(k0, cu_q, cu_k, max_q, max_k): per document, its query segment [max(a, q_start), min(b, q_end))
    and key segment [a, min(b, q_end)), keys counted from k0 (the first document's start)."""
    docs = query_documents(list(bounds), q_start, q_end)
    cu_q, cu_k = [0], [0]
    for a, b in docs:
        cu_q.append(cu_q[-1] + min(b, q_end) - max(a, q_start))
        cu_k.append(cu_k[-1] + min(b, q_end) - a)
    max_q = max(y - x for x, y in zip(cu_q[:-1], cu_q[1:]))
    max_k = max(y - x for x, y in zip(cu_k[:-1], cu_k[1:]))
    as_t = lambda c: torch.tensor(c, dtype=torch.int32, device=device)  # noqa: E731
    return docs[0][0], as_t(cu_q), as_t(cu_k), max_q, max_k


@functools.cache
def _takes_enable_gqa(fn) -> bool:
    return "enable_gqa" in inspect.signature(fn).parameters


def _varlen(q, k, v, bounds, causal, q_start, scale) -> Optional[torch.Tensor]:
    """Flash attention over per-document segments; None where it cannot run (then flex).
    Causal with q_start > 0: each document's query segment is its part in [q_start, q_end) and its
    key segment runs from the document's start to the same end; flash aligns a causal window to
    the bottom right, which is exactly where those two segments end together."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    q_end = q_start + q.shape[0]
    k0, cu_q, cu_k, max_q, max_k = _varlen_plan(tuple(bounds), q_start, q_end, q.device)
    k, v = k[k0:q_end], v[k0:q_end]
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if _takes_enable_gqa(varlen_attn):
            gqa["enable_gqa"] = True
        else:  # torch <= 2.11: repeat the KV heads (query head i reads KV head i // rep)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                       window_size=(-1, 0) if causal else (-1, -1), **gqa)
