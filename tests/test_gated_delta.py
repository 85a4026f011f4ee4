"""Gated delta rule: chunked and recurrent paths vs an independent float64 step-by-step reference.

The reference below is written from the equations alone (reference doc, section 2):
    S̃ = α S;   u = β (v - S̃ᵀk);   S = S̃ + k uᵀ;   o = scale · Sᵀq
and shares no code with model/ops. Forward outputs, final states and gradients of every input are compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.ops import chunk_gated_delta_rule, recurrent_gated_delta_rule, set_default_backend

IMPLS = {"chunk": chunk_gated_delta_rule, "recurrent": recurrent_gated_delta_rule}


def reference(q, k, v, g, beta, scale=None, h0=None, l2norm=False):
    """float64 loop over batch, head and time. q, k [B,T,Hqk,K]; v [B,T,H,V]; g, beta [B,T,H]; h0 [B,H,K,V]."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, Hqk, K = q.shape
    H, V = v.shape[2:]
    scale = K**-0.5 if scale is None else scale
    if l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    outs, finals = [], []
    for b in range(B):
        o_b, s_b = [], []
        for h in range(H):
            kh = h // (H // Hqk)  # value head h reads key head h // r
            S = torch.zeros(K, V, dtype=torch.float64) if h0 is None else h0[b, h].double()
            o_bh = []
            for t in range(T):
                S = torch.exp(g[b, t, h]) * S
                u = beta[b, t, h] * (v[b, t, h] - S.T @ k[b, t, kh])
                S = S + torch.outer(k[b, t, kh], u)
                o_bh.append(S.T @ q[b, t, kh] * scale)
            o_b.append(torch.stack(o_bh) if T else v.new_zeros(0, V).double())
            s_b.append(S)
        outs.append(torch.stack(o_b, dim=1))
        finals.append(torch.stack(s_b))
    return torch.stack(outs), torch.stack(finals)


def make_inputs(B, T, Hqk, H, K, V, dtype=torch.float32, h0=True, n_states=None, seed=0):
    """Realistic ranges: β in (0,1), g = -softplus(.) (decay per step in (0,1)), unit-norm k."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hqk, K, generator=gen)
    k = F.normalize(torch.randn(B, T, Hqk, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -F.softplus(torch.randn(B, T, H, generator=gen) - 1.0)
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(n_states or B, H, K, V, generator=gen) if h0 else None
    return [None if x is None else x.to(dtype) for x in (q, k, v, g, beta, s0)]


def run_with_grads(fn, inputs, w_o, w_s, **kw):
    """(o, S, grads of sum(o w_o) + sum(S w_s) w.r.t. every non-None input)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, s0 = leaves
    o, s = fn(q, k, v, g, beta, initial_state=s0, output_final_state=True, **kw)
    loss = (o.double() * w_o).sum() + (s.double() * w_s).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return o, s, grads


def ref_with_grads(inputs, w_o, w_s, l2norm=False, scale=None):
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    q, k, v, g, beta, s0 = leaves
    o, s = reference(q, k, v, g, beta, scale=scale, h0=s0, l2norm=l2norm)
    loss = (o * w_o).sum() + (s * w_s).sum()
    return o, s, torch.autograd.grad(loss, [x for x in leaves if x is not None])


def assert_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} x {scale:.2f}"


NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize(
    "T, heads, with_h0, l2norm",
    [
        (1, (2, 2), True, False),
        (63, (2, 2), False, True),
        (64, (1, 2), True, True),
        (65, (2, 2), True, False),
        (130, (2, 4), True, True),
        (130, (2, 2), False, False),
    ],
)
def test_matches_reference_fp32(impl, T, heads, with_h0, l2norm):
    B, K, V = 2, 16, 8
    inputs = make_inputs(B, T, *heads, K, V, h0=with_h0, seed=T)
    w_o = torch.randn(B, T, heads[1], V, dtype=torch.float64)
    w_s = torch.randn(B, heads[1], K, V, dtype=torch.float64)
    o, s, grads = run_with_grads(IMPLS[impl], inputs, w_o, w_s, use_qk_l2norm_in_kernel=l2norm)
    o_ref, s_ref, grads_ref = ref_with_grads(inputs, w_o, w_s, l2norm=l2norm)
    assert o.dtype == torch.float32 and o.shape == (B, T, heads[1], V)
    assert s.dtype == torch.float32 and s.shape == (B, heads[1], K, V)
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(s, s_ref, 1e-5, "final state")
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    for name, a, b in zip(names, grads, grads_ref):
        assert_close(a, b, 1e-4, name)


def test_chunk_exact_in_fp64():
    """fp64 inputs compute in fp64: the chunked algebra matches the step loop to rounding."""
    B, T, K, V = 1, 150, 8, 8
    inputs = make_inputs(B, T, 2, 4, K, V, dtype=torch.float64, seed=1)
    w_o, w_s = torch.randn(B, T, 4, V, dtype=torch.float64), torch.randn(B, 4, K, V, dtype=torch.float64)
    o, s, grads = run_with_grads(chunk_gated_delta_rule, inputs, w_o, w_s, scale=0.3)
    o_ref, s_ref, grads_ref = ref_with_grads(inputs, w_o, w_s, scale=0.3)
    assert_close(o, o_ref, 1e-11, "o")
    assert_close(s, s_ref, 1e-11, "final state")
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert_close(a, b, 1e-10, name)


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
@pytest.mark.parametrize("with_h0", [True, False])
def test_packed_documents_match_separate_runs(impl, with_h0):
    """cu_seqlens: each document runs from its own initial state; nothing crosses a boundary."""
    lengths = [1, 70, 5, 64, 1, 129]
    H, K, V = 2, 8, 8
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T = sum(lengths)
    inputs = make_inputs(1, T, 1, H, K, V, h0=with_h0, n_states=len(lengths), seed=3)
    w_o = torch.randn(1, T, H, V, dtype=torch.float64)
    w_s = torch.randn(len(lengths), H, K, V, dtype=torch.float64)
    o, s, grads = run_with_grads(IMPLS[impl], inputs, w_o, w_s, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    assert o.shape == (1, T, H, V) and s.shape == (len(lengths), H, K, V)

    # expected: each document alone through the reference, gradients summed into the packed layout
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    q, k, v, g, beta, s0 = leaves
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        h0 = None if s0 is None else s0[i : i + 1]
        o_i, s_i = reference(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], h0=h0, l2norm=True)
        outs.append(o_i)
        finals.append(s_i)
    o_ref, s_ref = torch.cat(outs, dim=1), torch.cat(finals)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), [x for x in leaves if x is not None])
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(s, s_ref, 1e-5, "final state")
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert_close(a, b, 1e-4, name)


def test_packed_chunk_equals_per_document_chunk():
    """The packed chunk path equals calling the chunk path once per document (same algorithm, no leaks)."""
    lengths = [3, 200, 1, 64]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v, g, beta, s0 = make_inputs(1, sum(lengths), 2, 2, 16, 16, n_states=len(lengths), seed=4)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc = [x[:, a:b] for x in (q, k, v, g, beta)]
        o_i, s_i = chunk_gated_delta_rule(*doc, initial_state=s0[i : i + 1], output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[i : i + 1], s_i, atol=1e-5, rtol=1e-5)


def _packed_reference(inputs, cu, w_o, w_s, l2norm=True):
    """Each document alone through the fp64 reference; gradients summed into the packed layout."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    q, k, v, g, beta, s0 = leaves
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        h0 = None if s0 is None else s0[i : i + 1]
        o_i, s_i = reference(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], h0=h0, l2norm=l2norm)
        outs.append(o_i)
        finals.append(s_i)
    o_ref, s_ref = torch.cat(outs, dim=1), torch.cat(finals)
    grads = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), [x for x in leaves if x is not None])
    return o_ref, s_ref, grads


def _check_packed(lengths, heads, K, V, dtype, tol_o, tol_g, seed, with_h0=True):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    T, H = sum(lengths), heads[1]
    inputs = make_inputs(1, T, *heads, K, V, dtype=dtype, h0=with_h0, n_states=len(lengths), seed=seed)
    w_o = torch.randn(1, T, H, V, dtype=torch.float64)
    w_s = torch.randn(len(lengths), H, K, V, dtype=torch.float64)
    kw = dict(cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o, s, grads = run_with_grads(chunk_gated_delta_rule, inputs, w_o, w_s, **kw)
    assert o.shape == (1, T, H, V) and s.shape == (len(lengths), H, K, V)
    o_ref, s_ref, grads_ref = _packed_reference(inputs, cu, w_o, w_s)
    assert_close(o, o_ref, tol_o, "o")
    assert_close(s, s_ref, tol_o, "final state")
    names = [n for n, x in zip(NAMES, inputs) if x is not None]
    for name, a, b in zip(names, grads, grads_ref):
        assert_close(a, b, tol_g, name)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dtype, tol_o, tol_g", [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-11, 1e-10)])
def test_skewed_packing_matches_per_document(monkeypatch, recompute, dtype, tol_o, tol_g):
    """Documents of very different chunk counts (1 .. 5 chunks, ending mid-chunk and on a boundary):
    outputs, final states and every gradient equal per-document runs; fp64 stays exact."""
    import model.ops.gated_delta_chunk as chunk_mod

    monkeypatch.setattr(chunk_mod, "RECOMPUTE_IN_BACKWARD", recompute)
    _check_packed([3, 300, 1, 64, 65, 200], (1, 2), 8, 8, dtype, tol_o, tol_g, seed=12)


def test_many_short_documents():
    """40 documents of 1 .. 80 tokens (one or two chunks each), from their own initial states."""
    gen = torch.Generator().manual_seed(13)
    lengths = torch.randint(1, 81, (40,), generator=gen).tolist()
    _check_packed(lengths, (2, 2), 8, 8, torch.float32, 1e-5, 1e-4, seed=13)


@pytest.mark.parametrize("with_h0", [True, False])
def test_empty_documents(with_h0):
    """Zero-length documents (repeated cu_seqlens entries) pass their initial state through unchanged."""
    _check_packed([0, 5, 0, 70, 0], (1, 2), 8, 8, torch.float32, 1e-5, 1e-4, seed=14, with_h0=with_h0)


def test_packed_layout_is_proportional_to_tokens():
    """Each document is padded only to its own multiple of 64: no padding to the longest document."""
    from model.ops.gated_delta_chunk import _ChunkLayout

    lengths = [3396, 100, 100, 100, 100, 100, 100, 100]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    layout = _ChunkLayout(1, sum(lengths), 64, cu, "cpu")
    assert layout.m == sum(-(-n // 64) for n in lengths) == 68
    assert layout.counts == [8, 8] + [1] * 52
    x = torch.randn(1, sum(lengths), 2, 3)
    chunks = layout.to_chunks(x)
    assert chunks.shape == (68, 2, 64, 3)
    torch.testing.assert_close(layout.from_chunks(chunks), x, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["chunk", "recurrent"])
def test_bf16_inputs(impl):
    """bf16 in, fp32 accumulation inside: output bf16, final state fp32, close to fp64 on the same inputs."""
    B, T, K, V = 1, 100, 16, 16
    inputs = make_inputs(B, T, 1, 2, K, V, dtype=torch.bfloat16, seed=5)
    w_o, w_s = torch.randn(B, T, 2, V, dtype=torch.float64), torch.randn(B, 2, K, V, dtype=torch.float64)
    o, s, grads = run_with_grads(IMPLS[impl], inputs, w_o, w_s, use_qk_l2norm_in_kernel=True)
    o_ref, s_ref, grads_ref = ref_with_grads(inputs, w_o, w_s, l2norm=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert all(gr.dtype == torch.bfloat16 for gr in grads[:5])
    assert_close(o, o_ref, 1e-2, "o")  # bf16 output rounding (8 mantissa bits)
    assert_close(s, s_ref, 1e-4, "final state")  # fp32 state
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert_close(a, b, 1e-2, name)


def test_strong_decay_stays_finite():
    """Cumulative log-decays of -1000 within a chunk: no overflow (all exponents are <= 0)."""
    q, k, v, g, beta, s0 = make_inputs(1, 128, 1, 1, 8, 8, seed=6)
    g = torch.full_like(g, -20.0)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, s0)]
    o, s = chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    o_ref, s_ref = recurrent_gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    (o.sum() + s.sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def test_no_final_state_and_grad_without_it():
    q, k, v, g, beta, _ = make_inputs(2, 70, 2, 2, 8, 8, h0=False, seed=7)
    for fn in IMPLS.values():
        o, s = fn(q, k, v, g, beta)
        assert s is None and o.shape == (2, 70, 2, 8)
    q.requires_grad_()
    chunk_gated_delta_rule(q, k, v, g, beta)[0].sum().backward()
    assert torch.isfinite(q.grad).all()


def test_errors_teach():
    q, k, v, g, beta, s0 = make_inputs(2, 10, 2, 3, 8, 8, seed=8)
    with pytest.raises(ValueError, match="multiple of query/key heads"):
        chunk_gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta, s0 = make_inputs(2, 10, 2, 2, 8, 8, seed=8)
    with pytest.raises(ValueError, match="B must be 1"):
        chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0[:1])
    with pytest.raises(ValueError, match="beta"):
        chunk_gated_delta_rule(q, k, v, g, beta[..., :1])


def test_backend_selection():
    q, k, v, g, beta, _ = make_inputs(1, 8, 1, 1, 8, 8, seed=9)
    with pytest.raises(RuntimeError, match="fla"):
        chunk_gated_delta_rule(q, k, v, g, beta, backend="fla")  # CPU tensors: fla cannot run
    with pytest.raises(ValueError, match="backend"):
        set_default_backend("triton")
    set_default_backend("torch")
    try:
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    finally:
        set_default_backend("auto")
    torch.testing.assert_close(o, chunk_gated_delta_rule(q, k, v, g, beta, backend="torch")[0])


def test_recompute_and_kept_factors_give_same_grads(monkeypatch):
    """Backward either recomputes the intra-chunk factors (accelerators) or keeps them (CPU): same result."""
    import model.ops.gated_delta_chunk as chunk_mod

    inputs = make_inputs(2, 100, 1, 2, 8, 8, seed=10)
    w_o, w_s = torch.randn(2, 100, 2, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    results = []
    for recompute in (True, False):
        monkeypatch.setattr(chunk_mod, "RECOMPUTE_IN_BACKWARD", recompute)
        results.append(run_with_grads(chunk_gated_delta_rule, inputs, w_o, w_s, use_qk_l2norm_in_kernel=True))
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _fla_available() -> bool:
    """fla importable on CUDA, with a backward it does not refuse on this GPU and Triton."""
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:
        return False
    from model.ops.gated_delta import fla_backward_refusal

    return torch.cuda.is_available() and fla_backward_refusal() is None


@pytest.mark.gpu
@pytest.mark.skipif(not _fla_available(),
                    reason="needs CUDA and flash-linear-attention with a working backward")
@pytest.mark.parametrize("heads", [(2, 2), (1, 2)])
def test_fla_matches_torch_path_on_cuda(heads):
    """The dispatch target (fla's Triton kernel) and our PyTorch path agree, packed documents included."""
    lengths = [1, 100, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda")
    inputs = make_inputs(1, sum(lengths), *heads, 64, 64, dtype=torch.bfloat16, n_states=len(lengths), seed=11)
    inputs = [x.cuda() for x in inputs]
    w_o = torch.randn(1, sum(lengths), heads[1], 64, dtype=torch.float64, device="cuda")
    w_s = torch.randn(len(lengths), heads[1], 64, 64, dtype=torch.float64, device="cuda")
    kw = dict(cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    o_f, s_f, g_f = run_with_grads(chunk_gated_delta_rule, inputs, w_o, w_s, backend="fla", **kw)
    o_t, s_t, g_t = run_with_grads(chunk_gated_delta_rule, inputs, w_o, w_s, backend="torch", **kw)
    assert_close(o_f, o_t, 2e-2, "o")
    assert_close(s_f, s_t, 1e-2, "final state")
    for name, a, b in zip(NAMES, g_f, g_t):
        assert_close(a, b, 5e-2, name)


@pytest.mark.parametrize("hopper,above_3_4,above_3_7_1,tilelang,refuses", [
    (True, True, False, False, True),    # the H200 image: Triton 3.6
    (True, True, True, False, False),    # Triton >= 3.7.1
    (True, True, False, True, False),    # tilelang takes the backward
    (False, True, False, False, False),  # not Hopper
])
def test_fla_backward_refusal_follows_flas_own_condition(monkeypatch, hopper, above_3_4, above_3_7_1,
                                                         tilelang, refuses):
    """fla 0.6 raises in chunk_bwd_dqkwg under exactly these flags; 'auto' must see it first."""
    import importlib.util
    import sys
    import types

    from model.ops.gated_delta import fla_backward_refusal

    utils = types.ModuleType("fla.utils")
    utils.IS_NVIDIA_HOPPER, utils.TRITON_ABOVE_3_4_0 = hopper, above_3_4
    utils.TRITON_ABOVE_3_7_1 = above_3_7_1
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.utils", utils)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tilelang" and tilelang else
                        (None if name == "tilelang" else real_find_spec(name, *a)))
    fla_backward_refusal.cache_clear()
    why = fla_backward_refusal()
    fla_backward_refusal.cache_clear()  # the fakes must not outlive the test
    assert (why is not None) == refuses
    if refuses:
        assert "Triton 3.6.0" in why and "3.7.1" in why
