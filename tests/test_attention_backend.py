"""The attention seam (model/attention_backend.py) against the dense masked SDPA it replaced: packed
documents of lengths 1, 63, 64, 65, a long one and many short ones, whole and as a context-parallel
rank's query slice; forward and gradients. The CUDA backends run where a GPU is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import attention_backend as ab
from model.attention_backend import packed_attention
from model.config import load_model_config
from model.language_model import Qwen35LM

LENGTHS = [1, 63, 64, 65, 700, *([3] * 40), 5, 130]


def dense_reference(q, k, v, cu, q_start=0, causal=True):
    """The old path: one SDPA call with a [Nq, Nk] mask, causal and block-diagonal."""
    nk, nq = k.shape[0], q.shape[0]
    lengths = (cu[1:] - cu[:-1])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(nk)
    qpos = pos[q_start:q_start + nq]
    mask = doc[q_start:q_start + nq, None] == doc[None]
    if causal:
        mask &= pos[None] <= qpos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask[None, None],
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


def inputs(dtype, device="cpu", lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(n, 4, 16, generator=g, dtype=dtype).to(device)
    k = torch.randn(n, 2, 16, generator=g, dtype=dtype).to(device)
    v = torch.randn(n, 2, 16, generator=g, dtype=dtype).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, cu


@pytest.mark.parametrize("q_start,q_len", [(0, None), (64, 300), (500, 800), (1, 1)])
def test_sdpa_matches_dense_mask(q_start, q_len):
    q, k, v, cu = inputs(torch.float32)
    q_len = q_len or q.shape[0]
    qs = q[q_start:q_start + q_len]
    out = packed_attention(qs, k, v, cu, q_start=q_start, backend="sdpa")
    ref = dense_reference(qs, k, v, cu, q_start)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_gradients_match_dense_mask():
    q, k, v, cu = inputs(torch.float64)
    for x in (q, k, v):
        x.requires_grad_(True)
    w = torch.randn(q.shape[0] - 100, 4, 16, dtype=torch.float64)
    out = packed_attention(q[100:], k, v, cu, q_start=100, backend="sdpa")
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = dense_reference(q[100:], k, v, cu, 100)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_sdpa_never_builds_a_mask_across_documents(monkeypatch):
    """Every SDPA call's mask (if any) stays within a block of short documents."""
    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ab.F, "scaled_dot_product_attention", spy)
    q, k, v, cu = inputs(torch.float32, lengths=[3000, 2000, *([7] * 200)])
    packed_attention(q, k, v, cu, backend="sdpa")
    assert len(shapes) > 2 and shapes[:2] == [None, None]  # the long documents: no mask
    assert all(s[0] <= ab.BLOCK_TOKENS and s[1] <= ab.BLOCK_TOKENS for s in shapes[2:])


def test_flex_eager_matches_sdpa_on_cpu():
    q, k, v, cu = inputs(torch.float64, lengths=[1, 63, 64, 65, 40])
    for q_start in (0, 70):
        out = packed_attention(q[q_start:], k, v, cu, q_start=q_start, backend="flex")
        ref = packed_attention(q[q_start:], k, v, cu, q_start=q_start, backend="sdpa")
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    full = packed_attention(q, k, v, cu, causal=False, backend="flex")
    torch.testing.assert_close(full, dense_reference(q, k, v, cu, causal=False), rtol=1e-10, atol=1e-12)


def test_non_causal_segments_as_the_vit_uses_them():
    q, k, v, cu = inputs(torch.float32, lengths=[16, 16, 64, 4])
    k, v = k.repeat(1, 2, 1), v.repeat(1, 2, 1)
    out = packed_attention(q, k, v, cu, causal=False, backend="sdpa")
    torch.testing.assert_close(out, dense_reference(q, k, v, cu, causal=False), rtol=1e-5, atol=1e-5)


@torch.no_grad()  # flex_attention has no backward on CPU (torch 2.13)
def test_model_logits_equal_across_cpu_backends():
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    model = Qwen35LM(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 96))
    cu = torch.tensor([0, 1, 64, 96, 161, 192])
    ref = model(ids, cu_seqlens=cu).logits
    for layer in model.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn.attn_backend = "flex"
    torch.testing.assert_close(model(ids, cu_seqlens=cu).logits, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend,dtype,tol", [("flex", torch.float32, 2e-5),
                                               ("varlen", torch.bfloat16, 2e-2)])
def test_cuda_backends_match_dense_mask(backend, dtype, tol):
    if backend == "varlen":  # packed_attention would quietly take flex without it
        pytest.importorskip("torch.nn.attention.varlen")
    q, k, v, cu = inputs(torch.float32, "cuda")
    for q_start in (0, 500):
        qs = q[q_start:]
        ref = dense_reference(qs.cpu(), k.cpu(), v.cpu(), cu, q_start).cuda()
        out = packed_attention(qs.to(dtype), k.to(dtype), v.to(dtype), cu.cuda(), q_start=q_start,
                               backend=backend)
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
