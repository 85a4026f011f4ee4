"""Context parallelism, the model's side: how a micro-batch is cut into one contiguous slice of the
token stream per rank, and the math each mixer and the loss do on a slice. Plain PyTorch: the
collectives come through `CPComm`, which parallel/context_parallel.py implements over a process
group (the model never imports torch.distributed).

Partition. The B packed rows of T tokens are one stream of N = B*T tokens (documents never cross a
row); rank r of `size` holds tokens [r*N/size, (r+1)*N/size): equal token counts, sequence order.
Documents may cross slice boundaries anywhere. Under context parallelism the decoder runs on
[1, N/size] and `SequenceContext.cp` is this rank's `CPSlice`.

- Gated attention: K and V all-gathered over the group (one collective per layer), queries local,
  masked by documents (model/attention_backend.py, q_start = the slice's start).
- Gated DeltaNet: state passing (LASP-2). The state update is affine in the incoming state,
  S_out = M S_in + S0 per head (M [K, K], S0 [K, V]). Each rank runs the chunked kernel on its slice
  from a zero state with the value width extended by K columns whose initial state is the identity
  (for a first document continued from an earlier rank): the final state is [S0 | M] in one call.
  One all-gather of [S0 | M] per layer (independent of T), a local prefix combine gives this
  rank's true initial state, and a second kernel call gives the outputs. A document starting inside
  a slice resets the chain (its M is zero). The causal conv1d takes its (kernel-1)-token halo from
  the previous rank (dropped across a document boundary, as within a slice).
- Loss: every rank computes its share (sums over its tokens divided by counts over the whole
  micro-batch; the MoE balancing loss from global expert counts), so the shares add up to the
  one-process loss; the reported values are all-reduced, so every rank of the group holds the
  micro-batch's loss as one process would, and its gradient is the rank's share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch


class CPComm(Protocol):
    """The collectives context parallelism needs, over the ranks of one CP group."""

    rank: int
    size: int

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, ...] (same shape on every rank) -> [size * n, ...] in rank order; differentiable
        (the backward sums every rank's gradient of this rank's rows)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, outside autograd (counts, reported values)."""


@dataclass
class CPSlice:
    """This rank's slice [start, end) of the micro-batch's N = total tokens.

    cu_seqlens: [D+1] document boundaries over all N tokens (the keys' layout for attention).
    mtp_targets: per MTP depth k, [1, L] the labels of predicting token i+k+1 at position i.
    after_vision: [1, L] bool (vision models), `after_vision_mask` of the whole micro-batch, sliced.
    continues: the slice starts inside a document that began on an earlier rank.
    """

    comm: CPComm
    start: int
    end: int
    total: int
    cu_seqlens: torch.Tensor
    mtp_targets: list = field(default_factory=list)
    after_vision: Optional[torch.Tensor] = None
    continues: bool = False

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(x)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(x)


def slice_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of rank's slice of `total` tokens (total divisible by size)."""
    if total % size:
        raise ValueError(f"context parallelism: {total} tokens do not split into {size} equal slices")
    n = total // size
    return rank * n, (rank + 1) * n


def local_cu_seqlens(cu_seqlens: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Global document boundaries [D+1] -> those of the slice [start, end), relative to start."""
    inner = cu_seqlens[(cu_seqlens > start) & (cu_seqlens < end)] - start
    return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), end - start)])


def flat_slice(x: torch.Tensor, start: int, end: int, fill=0) -> torch.Tensor:
    """x [B, T, ...] -> [1, end - start, ...] of the flattened stream, `fill` past its end."""
    flat = x.reshape(1, -1, *x.shape[2:])
    n = flat.shape[1]
    out = flat[:, start:min(end, n)]
    if end > n:
        out = torch.cat([out, torch.full_like(flat[:, : end - n], fill)], dim=1)
    return out


# ---- Gated DeltaNet -------------------------------------------------------------------------------

def conv_halo(x: torch.Tensor, pos_in_doc: torch.Tensor, width: int, cp: CPSlice
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous rank's last `width` tokens prepended: x [1, L, C] -> [1, width + L, C], and
    pos_in_doc [1, L] -> [1, width + L]. The halo's positions are its true ones relative to this
    slice's first document (pos_in_doc[0] - width ...), so the convolution's document rule drops
    the taps that reach into an earlier document; on rank 0 the halo is zeros and dropped alike."""
    tails = cp.all_gather(x[0, -width:])                       # [size * width, C]
    if cp.rank == 0:
        halo = tails[:width] * 0  # zeros that keep the gather in the graph
    else:
        halo = tails[(cp.rank - 1) * width: cp.rank * width]
    offsets = torch.arange(-width, 0, device=pos_in_doc.device)
    halo_pos = pos_in_doc[:, :1] + offsets  # < 0 where the halo lies before the document's start
    return torch.cat([halo[None], x], dim=1), torch.cat([halo_pos, pos_in_doc], dim=1)


def gated_delta_cp(kernel, q, k, v, g, beta, cu_seqlens: torch.Tensor, continues: bool,
                   cp: CPSlice) -> torch.Tensor:
    """The gated delta rule on this rank's slice with the state passed from earlier ranks.

    kernel: `chunk_gated_delta_rule`. q, k [1, L, Hk, K]; v [1, L, H, V]; g, beta [1, L, H];
    cu_seqlens: the slice's own document boundaries; continues: the slice's first document began
    on an earlier rank. -> o [1, L, H, V] in v's dtype.
    """
    n_docs = cu_seqlens.numel() - 1
    h, kd, vd = v.shape[2], k.shape[3], v.shape[3]
    dtype = torch.promote_types(v.dtype, torch.float32)  # the summary in fp32 at least
    # Pass 1: [S0 | M] of the slice's last document from a zero state, M through K extra value
    # columns whose initial state is the identity (only where the first document continues).
    v_aug = torch.cat([v.to(dtype), v.new_zeros(*v.shape[:3], kd, dtype=dtype)], dim=-1)
    h0 = v.new_zeros(n_docs, h, kd, vd + kd, dtype=dtype)
    if continues:
        h0[0, :, :, vd:] = torch.eye(kd, dtype=dtype, device=v.device)
    _, final = kernel(k.to(dtype), k.to(dtype), v_aug, g, beta, initial_state=h0,
                      output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True)
    summaries = cp.all_gather(final[-1:].to(dtype))           # [size, H, K, V + K]
    s0, m = summaries[..., :vd], summaries[..., vd:]
    state = summaries.new_zeros(h, kd, vd) + summaries.sum() * 0  # every rank runs the backward
    for r in range(cp.rank):  # S_in(r + 1) = M_r S_in(r) + S0_r
        state = m[r] @ state + s0[r]
    init = torch.zeros(n_docs, h, kd, vd, dtype=dtype, device=v.device)
    init = torch.cat([state[None] if continues else init[:1] + state[None] * 0, init[1:]])
    # Pass 2: the outputs, from the true initial state.
    o, _ = kernel(q, k, v, g, beta, initial_state=init, cu_seqlens=cu_seqlens,
                  use_qk_l2norm_in_kernel=True)
    return o


# ---- MoE and the loss -----------------------------------------------------------------------------

def moe_loss_shares(probs: torch.Tensor, counts: torch.Tensor, lse: torch.Tensor, top_k: int,
                    cp: CPSlice) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shares of the Switch balancing loss and the z-loss of one MoE layer over the
    whole micro-batch: E * sum_e f_e P_e with the global routed shares f and this rank's part of
    the global mean probability P; z: its part of the mean of lse^2.

    probs [n, E], counts [E] (this rank's routing), lse [n] -> two scalars."""
    e = probs.shape[1]
    f = cp.all_reduce(counts.to(probs.dtype)) / max(cp.total * top_k, 1)
    aux = e * (f * probs.sum(dim=0)).sum() / cp.total
    return aux, lse.square().sum() / cp.total


def report(cp: CPSlice, shares: dict) -> dict:
    """{name: scalar share} -> {name: the group's sum as value, this rank's share as gradient},
    in one all-reduce."""
    names = [n for n, v in shares.items() if v is not None]
    if not names:
        return shares
    local = torch.stack([shares[n].detach() for n in names])
    total = cp.all_reduce(local)
    out = dict(shares)
    for i, n in enumerate(names):
        out[n] = shares[n] + (total[i] - local[i])
    return out
