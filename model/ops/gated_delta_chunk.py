"""Chunked (WY / UT-transform) gated delta rule in plain PyTorch.

The math core behind `model.ops.gated_delta.chunk_gated_delta_rule`. Inputs arrive already prepared
(compute dtype, heads expanded, q/k normalised, q scaled); see the reference, section 2 "Chunked form".

Per chunk of C positions (γ = within-chunk cumsum of g, Γ_ij = exp(γ_i - γ_j) for i >= j else 0):
    A = strict_lower(diag(β) K Kᵀ ⊙ Γ),   T = (I + A)⁻¹
    U = T diag(β) V,   W = T diag(β e^γ) K
    V' = U - W S,   O = (Q ⊙ e^γ) S + (Q Kᵀ ⊙ Γ) V',   S <- e^{γ_last} S + (K ⊙ e^{γ_last - γ})ᵀ V'
Everything except the S recurrence is batched over all chunks; only the state pass loops over chunks.
`_ChunkGatedDelta` has a hand-written backward, so autograd never sees per-chunk slices (indexing one
chunk per step under autograd materialises a full-size zero gradient per chunk: quadratic in T).

Internal layout is chunk-first: [NC, N, H, C, D] (NC chunks, N sequences, H heads, C positions),
so `x[n]` in the state loop is a contiguous view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_SIZE = 64
# Recompute the intra-chunk factors in backward (True), keep them from forward (False), or None: keep on
# CPU, where this path is the production one and memory is plentiful, recompute on accelerators (where
# fla normally runs instead and activation memory is the scarce resource).
RECOMPUTE_IN_BACKWARD: bool | None = None
# the `_intra_chunk` factors that backward reads
_FACTORS = ("decay", "eg", "kk", "a_mat", "uw", "w", "to_end", "k_dec", "a", "p")


class _ChunkLayout:
    """Maps [B, T, H, *] token tensors to chunk-first [NC, N, H, C, *] and back.

    Without cu_seqlens, N = B and T is zero-padded to a multiple of C. With cu_seqlens (B == 1), each of
    the N documents is padded to its own multiple of C and laid out as its own row, so no chunk (and no
    cumsum of g) ever crosses a document boundary. Shorter documents get trailing all-zero chunks; with
    g = 0, β = 0 and k = 0 there those leave the state untouched.
    """

    def __init__(self, batch: int, seqlen: int, chunk: int, cu_seqlens: Tensor | None, device):
        self.chunk, self.seqlen, self.dest = chunk, seqlen, None
        if cu_seqlens is None:
            self.n, self.nc = batch, max(1, -(-seqlen // chunk))
            return
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        self.n = lengths.numel()
        self.nc = max(1, -(-int(lengths.max()) // chunk)) if self.n else 1
        tok = torch.arange(seqlen, device=device)
        doc = torch.searchsorted(cu[1:], tok, right=True)
        # flat row index of each packed token in the [N * NC * C] padded buffer
        self.dest = doc * (self.nc * chunk) + (tok - cu[doc])

    @property
    def padded_len(self) -> int:
        return self.nc * self.chunk

    def to_chunks(self, x: Tensor) -> Tensor:
        """[B, T, H, *rest] -> [NC, N, H, C, *rest] (zero-padded)."""
        if self.dest is None:
            if self.padded_len != self.seqlen:
                x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, self.padded_len - self.seqlen])
        else:
            buf = x.new_zeros(self.n * self.padded_len, *x.shape[2:])
            x = buf.index_copy(0, self.dest, x[0]).view(self.n, self.padded_len, *x.shape[2:])
        x = x.reshape(self.n, self.nc, self.chunk, *x.shape[2:])
        perm = (1, 0, 3, 2) + tuple(range(4, x.dim()))
        return x.permute(perm).contiguous()

    def from_chunks(self, x: Tensor) -> Tensor:
        """[NC, N, H, C, D] -> [B, T, H, D] (padding dropped)."""
        heads, dim = x.shape[2], x.shape[-1]
        x = x.permute(1, 0, 3, 2, 4).reshape(self.n, self.padded_len, heads, dim)
        if self.dest is None:
            return x[:, : self.seqlen]
        return x.reshape(-1, *x.shape[2:])[self.dest].unsqueeze(0)


def _bmm_acc(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """out += alpha * a @ b in place over any leading batch dims (out contiguous): no product temporary."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), alpha=alpha)
    return out


def _as_3d(x: Tensor) -> Tensor:
    """[NC, N, H, R, S] -> [NC, N*H, R, S] for the bmm-family ops of the chunk loops (a view of our buffers)."""
    return x.flatten(1, -3)


def _unit_lower_solve(a_mat: Tensor, rhs: Tensor, transpose: bool = False) -> Tensor:
    """(I + A)⁻¹ rhs, or (I + A)⁻ᵀ rhs if transpose; A strictly lower [..,C,C], rhs [..,C,D].

    Posed as the right-sided solve Xᵀ (I + A)ᵀ = rhsᵀ so LAPACK sees column-major operands as plain
    views of our row-major tensors; the direct form copies both operands and is 2-3x slower on CPU.
    """
    a = a_mat if transpose else a_mat.transpose(-1, -2)
    return torch.linalg.solve_triangular(
        a, rhs.transpose(-1, -2), upper=not transpose, left=False, unitriangular=True
    ).transpose(-1, -2)


def _intra_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> dict[str, Tensor]:
    """The per-chunk factors, batched over all chunks (forward; rerun by backward when recomputing).

    q, k [NC,N,H,C,K]; v [NC,N,H,C,V]; g, beta [NC,N,H,C]. Names follow the module docstring.
    In-place ops where possible: on CPU these full-size elementwise passes cost as much as the matmuls.
    """
    C, V = q.shape[-2], v.shape[-1]
    gam = g.cumsum(-1)  # γ
    above = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    # mask before exp: γ_i - γ_j > 0 above the diagonal and could overflow
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill_(above, float("-inf")).exp_()  # Γ [..,C,C]
    eg = gam.exp()[..., None]
    kk = k @ k.transpose(-1, -2)
    a_mat = (kk * decay).mul_(beta[..., :, None]).tril_(-1)  # A = strict_lower(diag(β) K Kᵀ ⊙ Γ)
    # one batched solve for both WY factors: (I + A) [U | W] = [diag(β) V | diag(β e^γ) K]
    rhs = q.new_empty(*v.shape[:-1], V + k.shape[-1])
    torch.mul(v, beta[..., None], out=rhs[..., :V])
    torch.mul(k, beta[..., None] * eg, out=rhs[..., V:])
    uw = _unit_lower_solve(a_mat, rhs)
    last = gam[..., -1:]
    to_end = (last - gam).exp_()[..., None]  # e^{γ_last - γ}: decay from each token to the chunk end
    # every exponent here is <= 0, so nothing overflows however strong the decay
    return dict(
        decay=decay, eg=eg, kk=kk, a_mat=a_mat, uw=uw, u=uw[..., :V], w=uw[..., V:],
        to_end=to_end, k_dec=k * to_end,
        a=last.exp()[..., None],  # e^{γ_last} [..,1,1]: whole-chunk decay of the state
        p=(q @ k.transpose(-1, -2)).mul_(decay),  # P = Q Kᵀ ⊙ Γ (Γ is 0 above the diagonal)
    )  # fmt: skip


class _ChunkGatedDelta(torch.autograd.Function):
    """Chunk-first inputs -> (o, final state), with a hand-written backward.

    forward(q, k [NC,N,H,C,K], v [NC,N,H,C,V], g, beta [NC,N,H,C], h0 [N,H,K,V]) -> o [NC,N,H,C,V], S [N,H,K,V].
    Backward needs the outputs of the sequential loop (chunk-start states h [NC+1,N,H,K,V] and V'),
    which are always kept, and the intra-chunk factors, which are either recomputed (as fla's kernels
    do: activation memory stays ~inputs + h) or kept (~2x the inputs more, ~15% faster fwd+bwd); see
    `RECOMPUTE_IN_BACKWARD`. Autograd never sees the loop.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0):
        f = _intra_chunk(q, k, v, g, beta)
        u, w, k_dec, a = f["u"], f["w"], f["k_dec"], f["a"]
        h = q.new_empty(q.shape[0] + 1, *h0.shape)  # h[n] = state entering chunk n; h[-1] = final state
        v_new = torch.empty_like(u)  # V'_n = U_n - W_n S_n: what S_n does not already predict
        h[0] = h0
        u3, w3, kd3, vn3, h3 = (_as_3d(x) for x in (u, w, k_dec, v_new, h))
        for n in range(q.shape[0]):  # the only sequential part; out= / in-place: no per-step allocations
            torch.baddbmm(u3[n], w3[n], h3[n], alpha=-1.0, out=vn3[n])
            torch.mul(h[n], a[n], out=h[n + 1])
            h3[n + 1].baddbmm_(kd3[n].transpose(-1, -2), vn3[n])
        o = _bmm_acc((q * f["eg"]) @ h[:-1], f["p"], v_new)  # (Q ⊙ e^γ) S_n + P V'
        recompute = q.device.type != "cpu" if RECOMPUTE_IN_BACKWARD is None else RECOMPUTE_IN_BACKWARD
        ctx.save_for_backward(q, k, v, g, beta, h, v_new, *([] if recompute else [f[n] for n in _FACTORS]))
        return o, h[-1].clone()

    @staticmethod
    def backward(ctx, do, dh_final):
        q, k, v, g, beta, h, v_new, *kept = ctx.saved_tensors
        f = dict(zip(_FACTORS, kept)) if kept else _intra_chunk(q, k, v, g, beta)
        V = v.shape[-1]
        w, k_dec, a, p, eg, decay, a_mat = f["w"], f["k_dec"], f["a"], f["p"], f["eg"], f["decay"], f["a_mat"]
        do = do.contiguous()
        h_start = h[:-1]
        qe = q * eg
        # o = (Q ⊙ e^γ) S_n + P V'
        dqe = do @ h_start.transpose(-1, -2)
        ds = torch.empty_like(h)  # ds[n] = dL/dS_n; starts as the direct part: through o_n, or the output
        torch.matmul(qe.transpose(-1, -2), do, out=ds[:-1])
        ds[-1] = dh_final
        dp = do @ v_new.transpose(-1, -2)
        dv_new = p.transpose(-1, -2) @ do
        # adjoint of the state recurrence, in reverse: dS_n += a_n dS_{n+1} - W_nᵀ dV'_n,
        # where dV'_n first collects K_dec,n dS_{n+1} since V'_n is written into S_{n+1}
        w3, kd3, dvn3, ds3 = (_as_3d(x) for x in (w, k_dec, dv_new, ds))
        for n in range(q.shape[0] - 1, -1, -1):
            dvn3[n].baddbmm_(kd3[n], ds3[n + 1])
            ds[n].addcmul_(ds[n + 1], a[n])
            ds3[n].baddbmm_(w3[n].transpose(-1, -2), dvn3[n], alpha=-1.0)
        dh0, ds_next = ds[0], ds[1:]
        # V' = U - W S_n;  S_{n+1} = a S_n + K_decᵀ V'
        duw = q.new_empty(f["uw"].shape)  # contiguous: the layout `_unit_lower_solve` wants
        duw[..., :V] = dv_new
        torch.matmul(dv_new, h_start.transpose(-1, -2), out=duw[..., V:]).neg_()
        dk_dec = v_new @ ds_next.transpose(-1, -2)
        da = (h_start * ds_next).sum((-2, -1))  # [NC,N,H]
        # [U | W] = (I + A)⁻¹ rhs  =>  drhs = (I + A)⁻ᵀ d[U | W],  dA = -strict_lower(drhs [U | W]ᵀ)
        drhs = _unit_lower_solve(a_mat, duw, transpose=True)
        da_mat = (drhs @ f["uw"].transpose(-1, -2)).neg_().tril_(-1)
        drv, drk = drhs[..., :V], drhs[..., V:]
        # rhs = [β V | β e^γ K]
        dv = drv * beta[..., None]
        s_rk = (drk * k).sum(-1) * eg[..., 0]
        dbeta = (drv * v).sum(-1) + s_rk
        dgam = s_rk * beta
        dk = drk * (beta[..., None] * eg)
        # A = strict_lower(diag(β) K Kᵀ ⊙ Γ);  P = Q Kᵀ ⊙ Γ
        m = da_mat * decay
        dbeta += (m * f["kk"]).sum(-1)
        m.mul_(beta[..., :, None])  # dL/d(K Kᵀ)
        dqk = dp * decay
        dq = _bmm_acc(dqe * eg, dqk, k)
        _bmm_acc(dk, dqk.transpose(-1, -2), q)
        _bmm_acc(dk, m, k)
        _bmm_acc(dk, m.transpose(-1, -2), k)
        dk.addcmul_(dk_dec, f["to_end"])
        # γ enters via e^γ (Q, rhs), e^{γ_last - γ} (K_dec), e^{γ_last} (a) and Γ_ij = e^{γ_i - γ_j}
        s_kd = (dk_dec * k_dec).sum(-1)
        dgam += (dqe * qe).sum(-1) - s_kd
        dgam[..., -1] += s_kd.sum(-1) + da * a[..., 0, 0]
        e = dp.mul_(p).addcmul_(da_mat, a_mat)  # dΓ ⊙ Γ, summed over both uses of Γ
        dgam += e.sum(-1) - e.sum(-2)
        dg = dgam.flip(-1).cumsum(-1).flip(-1)  # γ = cumsum(g)
        return dq, dk, dv, dg, dbeta, dh0


def chunked_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Prepared inputs (one dtype, H heads everywhere, q already scaled) -> (o [B,T,H,V], S [N,H,K,V]).

    q, k [B,T,H,K]; v [B,T,H,V]; g, beta [B,T,H]; initial_state [N,H,K,V] or None.
    """
    B, T, H, K = q.shape
    layout = _ChunkLayout(B, T, chunk_size, cu_seqlens, q.device)
    qc, kc, vc, gc, bc = (layout.to_chunks(x) for x in (q, k, v, g, beta))
    if initial_state is None:
        initial_state = q.new_zeros(layout.n, H, K, v.shape[-1])
    o, final = _ChunkGatedDelta.apply(qc, kc, vc, gc, bc, initial_state)
    return layout.from_chunks(o), final
