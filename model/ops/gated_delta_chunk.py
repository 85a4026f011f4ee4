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

Internal layout is one flat list of chunks [M, H, C, D] (M chunks, H heads, C positions), as fla's
varlen path (`prepare_chunk_indices`): each sequence / packed document is padded only to a multiple of
C, so M = Σ_i ceil(len_i / C) and the batched work tracks the real number of tokens. The list is
ordered by "slot": slot j holds the j-th chunk of every sequence that has one, and within a slot the
sequences are ranked by decreasing number of chunks. So the state pass at slot j reads and writes
contiguous slices: chunks [off_j, off_j + c_j) and the states of sequences (in rank order) [0, c_j);
sequences with fewer chunks drop out at the end of the slot with their final state.
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
    """Maps [B, T, H, *] token tensors to the flat slot-ordered chunk list [M, H, C, *] and back.

    Without cu_seqlens, N = B rows of T tokens, each zero-padded to NC = ceil(T / C) chunks (at least 1):
    M = NC * B, chunk m = j * B + b. With cu_seqlens (B == 1), each of the N documents is padded to its
    own multiple of C, so no chunk (and no cumsum of g) ever crosses a document boundary, and nothing is
    padded to the longest document. The padding positions (g = 0, β = 0, k = 0) leave the state untouched.

    `counts[j]`: number of sequences having a chunk j; they sit at chunks [off_j, off_j + counts[j]) of
    the list, off_j = Σ_{i<j} counts[i]. Sequences are ranked by decreasing number of chunks (`order[r]`
    is the sequence of rank r; None when that is the identity), so slot j holds ranks 0 .. counts[j] - 1.
    """

    def __init__(self, batch: int, seqlen: int, chunk: int, cu_seqlens: Tensor | None, device):
        self.chunk, self.seqlen, self.dest, self.order, self.rank = chunk, seqlen, None, None, None
        if cu_seqlens is None:
            self.n, self.nc = batch, max(1, -(-seqlen // chunk))
            self.counts = [batch] * self.nc
        else:
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            lengths = cu[1:] - cu[:-1]
            self.n = lengths.numel()
            nch = [-(-n // chunk) for n in lengths.tolist()]
            order = sorted(range(self.n), key=lambda i: -nch[i])  # stable: ties keep document order
            self.nc = nch[order[0]] if self.n else 0
            # counts[j] = sequences with more than j chunks (a prefix of the ranking): suffix sums of a histogram
            hist = [0] * (self.nc + 1)
            for c in nch:
                hist[c] += 1
            self.counts = []
            for c in range(self.nc, 0, -1):
                self.counts.append(hist[c] + (self.counts[-1] if self.counts else 0))
            self.counts.reverse()
            if order != list(range(self.n)):
                self.order = torch.tensor(order, device=device)
                self.rank = torch.empty_like(self.order)
                self.rank[self.order] = torch.arange(self.n, device=device)
            rank = self.rank if self.rank is not None else torch.arange(self.n, device=device)
            offsets = torch.tensor(_offsets(self.counts), dtype=torch.long, device=device)
            tok = torch.arange(seqlen, device=device)
            doc = torch.searchsorted(cu[1:], tok, right=True)
            pos = tok - cu[doc]
            # flat row index of each packed token in the [M * C] chunk buffer
            self.dest = (offsets[pos // chunk] + rank[doc]) * chunk + pos % chunk
        self.m = sum(self.counts)

    def to_chunks(self, x: Tensor) -> Tensor:
        """[B, T, H, *rest] -> [M, H, C, *rest] (zero-padded)."""
        if self.dest is None:
            padded = self.nc * self.chunk
            if padded != self.seqlen:
                x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, padded - self.seqlen])
            x = x.reshape(self.n, self.nc, self.chunk, *x.shape[2:])
            return x.permute((1, 0, 3, 2) + tuple(range(4, x.dim()))).contiguous().flatten(0, 1)
        buf = x.new_zeros(self.m * self.chunk, *x.shape[2:])
        x = buf.index_copy(0, self.dest, x[0]).view(self.m, self.chunk, *x.shape[2:])
        return x.permute((0, 2, 1) + tuple(range(3, x.dim()))).contiguous()

    def from_chunks(self, x: Tensor) -> Tensor:
        """[M, H, C, D] -> [B, T, H, D] (padding dropped)."""
        heads, dim = x.shape[1], x.shape[-1]
        if self.dest is None:
            x = x.view(self.nc, self.n, heads, self.chunk, dim).permute(1, 0, 3, 2, 4)
            return x.reshape(self.n, self.nc * self.chunk, heads, dim)[:, : self.seqlen]
        return x.transpose(1, 2).reshape(-1, heads, dim)[self.dest].unsqueeze(0)

    def to_ranked(self, x: Tensor) -> Tensor:
        """[N, ...] per-sequence tensor (original order) -> rank order (a differentiable gather)."""
        return x if self.order is None else x[self.order]

    def from_ranked(self, x: Tensor) -> Tensor:
        return x if self.rank is None else x[self.rank]


def _offsets(counts: list[int]) -> list[int]:
    """First chunk of each slot: exclusive prefix sums of the per-slot counts."""
    out = [0] * len(counts)
    for j in range(1, len(counts)):
        out[j] = out[j - 1] + counts[j - 1]
    return out


def _bmm_acc(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """out += alpha * a @ b in place over any leading batch dims (out contiguous): no product temporary."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), alpha=alpha)
    return out


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
    """Flat slot-ordered chunks -> (o, final states), with a hand-written backward.

    forward(q, k [M,H,C,K], v [M,H,C,V], g, beta [M,H,C], h0 [N,H,K,V] (rank order), counts) ->
    o [M,H,C,V], S [N,H,K,V] (rank order); `counts` as `_ChunkLayout.counts` (slot j = chunks
    [off_j, off_j + counts[j]) with off_j = Σ_{i<j} counts[i], for the sequences of rank 0 .. counts[j] - 1).
    Backward needs the outputs of the sequential loop (chunk-start states h [M,H,K,V] and V'),
    which are always kept, and the intra-chunk factors, which are either recomputed (as fla's kernels
    do: activation memory stays ~inputs + h) or kept (~2x the inputs more, ~15% faster fwd+bwd); see
    `RECOMPUTE_IN_BACKWARD`. Autograd never sees the loop.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, counts):
        f = _intra_chunk(q, k, v, g, beta)
        u, w, k_dec, a = f["u"], f["w"], f["k_dec"], f["a"]
        H = q.shape[1]
        h = q.new_empty(q.shape[0], *h0.shape[1:])  # h[m] = state entering chunk m
        final = q.new_empty(h0.shape)
        v_new = torch.empty_like(u)  # V'_m = U_m - W_m S_m: what S_m does not already predict
        n0 = counts[0] if counts else 0
        h[:n0] = h0[:n0]
        final[n0:] = h0[n0:]  # sequences without a chunk (empty documents)
        # [M*H, R, S] views: slot j is rows [off_j * H, (off_j + c_j) * H); one bmm-family call per slot
        u3, w3, kd3, vn3, h3, f3 = (x.flatten(0, 1) for x in (u, w, k_dec, v_new, h, final))
        off = 0
        for j, c in enumerate(counts):  # the only sequential part; out= / in-place: no per-step allocations
            nxt = off + c  # first chunk of slot j + 1; its first `c_next` sequences continue there
            c_next = counts[j + 1] if j + 1 < len(counts) else 0
            r0, r1 = off * H, nxt * H
            torch.baddbmm(u3[r0:r1], w3[r0:r1], h3[r0:r1], alpha=-1.0, out=vn3[r0:r1])
            # S <- a S + K_decᵀ V': sequences of rank < c_next continue into slot j + 1 (chunks nxt ..),
            # the others (rank c_next .. c - 1) end here, into `final`
            for lo, hi, dst, dst3, d in ((0, c_next, h, h3, nxt), (c_next, c, final, f3, c_next)):
                if hi > lo:
                    s0, s1 = off + lo, off + hi
                    torch.mul(h[s0:s1], a[s0:s1], out=dst[d : d + hi - lo])
                    kd, vn = kd3[s0 * H : s1 * H], vn3[s0 * H : s1 * H]
                    dst3[d * H : (d + hi - lo) * H].baddbmm_(kd.transpose(-1, -2), vn)
            off = nxt
        o = _bmm_acc((q * f["eg"]) @ h, f["p"], v_new)  # (Q ⊙ e^γ) S_m + P V'
        recompute = q.device.type != "cpu" if RECOMPUTE_IN_BACKWARD is None else RECOMPUTE_IN_BACKWARD
        ctx.save_for_backward(q, k, v, g, beta, h, v_new, *([] if recompute else [f[n] for n in _FACTORS]))
        ctx.counts = counts
        return o, final

    @staticmethod
    def backward(ctx, do, dh_final):
        q, k, v, g, beta, h_start, v_new, *kept = ctx.saved_tensors
        counts = ctx.counts
        f = dict(zip(_FACTORS, kept)) if kept else _intra_chunk(q, k, v, g, beta)
        H, V = q.shape[1], v.shape[-1]
        w, k_dec, a, p, eg, decay, a_mat = f["w"], f["k_dec"], f["a"], f["p"], f["eg"], f["decay"], f["a_mat"]
        do = do.contiguous()
        dh_final = dh_final.contiguous()
        qe = q * eg
        # o = (Q ⊙ e^γ) S_m + P V'
        dqe = do @ h_start.transpose(-1, -2)
        # ds[m] = dL/dS_m, starting as the direct part (through o_m); ds_next[m] = dL/d(state leaving
        # chunk m): the next chunk's ds, or the final state's. When every sequence has all slots (no
        # cu_seqlens, or equal chunk counts) that is a shifted view of [ds | dh_final], as ds[1:] is for
        # a single sequence; otherwise the state pass copies it in, slot by slot.
        M, N = q.shape[0], dh_final.shape[0]
        uniform = all(c == N for c in counts)
        ds_ext = q.new_empty(M + N, *dh_final.shape[1:]) if uniform else None
        ds = ds_ext[:M] if uniform else q.new_empty(M, *dh_final.shape[1:])
        torch.matmul(qe.transpose(-1, -2), do, out=ds)
        if uniform:
            ds_ext[M:] = dh_final
            ds_next = ds_ext[N:]
        else:
            ds_next = torch.empty_like(ds)
        dp = do @ v_new.transpose(-1, -2)
        dv_new = p.transpose(-1, -2) @ do
        # adjoint of the state recurrence, slot by slot in reverse: dS_m += a_m dS'_m - W_mᵀ dV'_m,
        # where dV'_m first collects K_dec,m dS'_m since V'_m is written into the state leaving chunk m
        w3, kd3, dvn3, ds3, dsn3 = (x.flatten(0, 1) for x in (w, k_dec, dv_new, ds, ds_next))
        offsets = _offsets(counts)
        for j in range(len(counts) - 1, -1, -1):
            off, c = offsets[j], counts[j]
            nxt, c_next = off + c, (counts[j + 1] if j + 1 < len(counts) else 0)
            if c_next and not uniform:  # continuing sequences: their next chunk's ds, complete since slot j + 1 is done
                ds_next[off : off + c_next] = ds[nxt : nxt + c_next]
            if c > c_next and not uniform:  # sequences ending here: the gradient of their final state
                ds_next[off + c_next : nxt] = dh_final[c_next:c]
            r0, r1 = off * H, nxt * H
            dvn3[r0:r1].baddbmm_(kd3[r0:r1], dsn3[r0:r1])
            ds[off:nxt].addcmul_(ds_next[off:nxt], a[off:nxt])
            ds3[r0:r1].baddbmm_(w3[r0:r1].transpose(-1, -2), dvn3[r0:r1], alpha=-1.0)
        n0 = counts[0] if counts else 0
        dh0 = torch.cat([ds[:n0], dh_final[n0:]])
        # V' = U - W S_m;  S'_m = a S_m + K_decᵀ V'
        duw = q.new_empty(f["uw"].shape)  # contiguous: the layout `_unit_lower_solve` wants
        duw[..., :V] = dv_new
        torch.matmul(dv_new, h_start.transpose(-1, -2), out=duw[..., V:]).neg_()
        dk_dec = v_new @ ds_next.transpose(-1, -2)
        da = (h_start * ds_next).sum((-2, -1))  # [M,H]
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
        return dq, dk, dv, dg, dbeta, dh0, None


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
    if initial_state is None:
        initial_state = q.new_zeros(layout.n, H, K, v.shape[-1])
    if layout.m == 0:  # only empty documents
        return v.new_zeros(B, T, H, v.shape[-1]), initial_state.clone()
    qc, kc, vc, gc, bc = (layout.to_chunks(x) for x in (q, k, v, g, beta))
    o, final = _ChunkGatedDelta.apply(qc, kc, vc, gc, bc, layout.to_ranked(initial_state), layout.counts)
    return layout.from_chunks(o), layout.from_ranked(final)
