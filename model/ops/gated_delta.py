"""Gated delta rule (Gated DeltaNet's token mixer), with flash-linear-attention's signature and layouts.

Per (sequence, value head), with state S [K, V], α_t = exp(g_t) and scale = K**-0.5 by default:
    S̃ = α_t S_{t-1};   u_t = β_t (v_t - S̃ᵀ k_t);   S_t = S̃ + k_t u_tᵀ;   o_t = scale · S_tᵀ q_t

- `recurrent_gated_delta_rule`: the readable definition, one Python step per token. Reference for tests.
- `chunk_gated_delta_rule`: the fast path. On CUDA with `fla` installed it calls fla's Triton kernel;
  otherwise the chunked WY/UT algorithm in `gated_delta_chunk.py` (plain PyTorch, differentiable).
  Force the PyTorch path per call with `backend="torch"`, or for the whole process with
  `set_default_backend("torch")` (e.g. in parity tests).

Shapes (fla layout): q, k [B,T,H_qk,K]; v [B,T,H,V]; g, beta [B,T,H]; initial_state [N,H,K,V];
H_qk must divide H (value head j reads key head j // (H / H_qk)). With `cu_seqlens` [N+1], B == 1 and
the T axis holds N packed documents, each starting from its own initial state; otherwise N == B.
Returns (o [B,T,H,V] in v's dtype, final_state [N,H,K,V] in fp32 or None). fp64 inputs compute in fp64;
everything else (bf16, fp16, fp32) computes in fp32.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from model.ops.gated_delta_chunk import CHUNK_SIZE, chunked_delta_rule

_BACKENDS = ("auto", "torch", "fla")
_default_backend = "auto"
_UNSET = object()
_fla_chunk_fn = _UNSET  # cached result of the lazy fla import (None when unavailable)


def set_default_backend(backend: str) -> None:
    """Process-wide backend for `chunk_gated_delta_rule`: "auto" (fla on CUDA if importable), "torch", "fla"."""
    global _default_backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {_BACKENDS}")
    _default_backend = backend


def _load_fla_chunk():
    # lazy: importing fla pulls in triton, which CPU-only installs lack and which slows every import
    global _fla_chunk_fn
    if _fla_chunk_fn is _UNSET:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        except Exception:  # ImportError, or triton failing to initialise
            fla_chunk = None
        _fla_chunk_fn = fla_chunk
    return _fla_chunk_fn


@functools.cache  # the answer cannot change within a process; find_spec searches sys.path
def fla_backward_refusal() -> str | None:
    """Why fla's gated backward would refuse on this machine, or None. fla 0.6 raises in the
    backward on Hopper with Triton in [3.4, 3.7.1) (wrong gradients, fla issue #640) unless tilelang
    is installed; "auto" then trains on the PyTorch path instead of failing at the first backward."""
    try:
        from importlib.util import find_spec

        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0
        from fla.utils import TRITON_ABOVE_3_7_1  # absent in releases that predate the bug
    except Exception:
        return None
    if IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1 and find_spec("tilelang") is None:
        import triton

        return (f"fla's gated backward refuses Triton {triton.__version__} on Hopper "
                "(needs >= 3.7.1 or tilelang)")
    return None


_warned_refusal = False


def _auto_uses_fla(q: Tensor, leaves) -> bool:
    """"auto" takes fla on CUDA unless a backward is coming that fla refuses (warned once)."""
    global _warned_refusal
    if not q.is_cuda or _load_fla_chunk() is None:
        return False
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in leaves) and (why := fla_backward_refusal()):
        if not _warned_refusal:
            _warned_refusal = True
            warnings.warn(f"{why}: training uses the PyTorch chunked kernel", stacklevel=3)
        return False
    return True


def _check(q, k, v, g, beta, initial_state, cu_seqlens) -> int:
    """Validate shapes with errors that name the offending argument; return N (number of sequences)."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be [B,T,H_qk,K]")
    B, T, H_qk, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v {tuple(v.shape)} must be [B={B},T={T},H,V]")
    H, V = v.shape[2:]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} {tuple(x.shape)} must be [B,T,H] = {(B, T, H)} (one value per value head)")
    if H % H_qk:
        raise ValueError(f"value heads H={H} must be a multiple of query/key heads H_qk={H_qk}")
    n = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the documents are packed along T, so B must be 1 (got B={B})")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}; got {cu_seqlens.tolist()}")
        n = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n, H, K, V):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be [N,H,K,V] = {(n, H, K, V)}")
    return n


def _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm_in_kernel):
    """Cast to the compute dtype, expand q/k heads to H, L2-normalise q/k if asked, fold scale into q."""
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    rep = v.shape[2] // q.shape[2]
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:  # scale rides on q's per-token factor: one full-size pass fewer
        q = q * (torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6) * scale)
        k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    else:
        q = q * scale
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    h0 = None if initial_state is None else initial_state.to(dtype)
    return q, k, v, g, beta, h0


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule (chunk size 64). Same contract as `recurrent_gated_delta_rule`.

    q, k [B,T,H_qk,K]; v [B,T,H,V]; g (log-decay), beta [B,T,H]; initial_state [N,H,K,V] | None;
    cu_seqlens LongTensor [N+1] | None -> (o [B,T,H,V] (v.dtype), final_state [N,H,K,V] fp32 | None).
    backend: None (use `set_default_backend`'s value, "auto" by default), "auto" (fla on CUDA when
    importable, else PyTorch), "torch" (always the PyTorch chunked path) or "fla" (error if unavailable).
    """
    backend = _default_backend if backend is None else backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {_BACKENDS}")
    _check(q, k, v, g, beta, initial_state, cu_seqlens)
    if backend == "fla" or (backend == "auto" and _auto_uses_fla(q, (q, k, v, g, beta, initial_state))):
        fla_chunk = _load_fla_chunk()
        if fla_chunk is not None and q.is_cuda:
            if (rep := v.shape[2] // q.shape[2]) > 1:
                # Not every fla release takes fewer q/k heads than value heads; transformers
                # repeats them before this call too (value head j reads q/k head j // rep).
                q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
            return fla_chunk(
                q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            )  # fmt: skip
        if backend == "fla":
            raise RuntimeError("backend='fla' needs CUDA tensors and an importable `fla` (flash-linear-attention)")
    # Autocast off: under bf16 autocast the chunk matmuls would drop to bf16, and the decay
    # products need fp32 accumulation.
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v32, g, beta, h0 = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm_in_kernel)
        o, final = chunked_delta_rule(q, k, v32, g, beta, h0, cu_seqlens, CHUNK_SIZE)
    return o.to(v.dtype), (final if output_final_state else None)


def _recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """One sequence batch, step by step. q, k [B,T,H,K]; v [B,T,H,V]; g, beta [B,T,H]; S [B,H,K,V]."""
    outs = []
    for q_t, k_t, v_t, g_t, b_t in zip(*(x.unbind(1) for x in (q, k, v, g, beta))):
        S = S * g_t.exp()[..., None, None]  # S̃ = α S
        u = b_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))  # u = β (v - S̃ᵀk)
        S = S + k_t[..., :, None] * u[..., None, :]  # S = S̃ + k uᵀ
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, S))  # o = Sᵀq (q carries the scale)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)  # T == 0: empty document
    return o, S


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Readable step-by-step gated delta rule (always PyTorch; slow, the reference for the chunked path).

    q, k [B,T,H_qk,K]; v [B,T,H,V]; g (log-decay), beta [B,T,H]; initial_state [N,H,K,V] | None;
    cu_seqlens LongTensor [N+1] | None -> (o [B,T,H,V] (v.dtype), final_state [N,H,K,V] fp32 | None).
    """
    n = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 steps, as above
        q, k, v32, g, beta, h0 = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm_in_kernel)
        if h0 is None:
            h0 = q.new_zeros(n, v.shape[2], q.shape[-1], v.shape[-1])
        if cu_seqlens is None:
            o, final = _recurrent(q, k, v32, g, beta, h0)
        else:  # each document on its own, from its own initial state
            bounds = cu_seqlens.tolist()
            outs, finals = [], []
            for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                o_i, f_i = _recurrent(q[:, s:e], k[:, s:e], v32[:, s:e], g[:, s:e], beta[:, s:e], h0[i : i + 1])
                outs.append(o_i)
                finals.append(f_i)
            o, final = torch.cat(outs, dim=1), torch.cat(finals, dim=0)
    return o.to(v.dtype), (final if output_final_state else None)
