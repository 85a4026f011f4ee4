"""Sparse Mixture-of-Experts block: fp32 softmax router, top-k, grouped SwiGLU experts, shared
expert with a sigmoid gate, Switch load-balancing loss, optional z-loss, optional
auxiliary-loss-free balancing bias, and per-layer expert-load counts.

The block hands tokens to experts through a dispatcher object (the expert-parallel seam): the local
one permutes tokens by expert in this process; an all-to-all one can replace it without touching
the math here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.context import SequenceContext, in_backward
from model.context_parallel import moe_loss_shares
from model.mlp import SwiGLU


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids idx [...] int64 -> copies per expert [num_experts] int64.

    A scatter-add, not bincount: the same integers, but an output size that does not depend on
    the values (bincount's is max(idx) + 1 when larger than minlength), so it also runs on fake
    tensors (parallel/rehearse.py)."""
    flat = idx.flatten()
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


class TopKRouter(nn.Module):
    """Scores tokens against experts in fp32 (fp64 for fp64 inputs).

    x [N, D] -> (logits [N, E], probs [N, E], idx [N, k], weights [N, k]).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # Selection-only bias of auxiliary-loss-free balancing; part of the checkpoint.
        self.use_bias_balancing = cfg.router_bias_balancing
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        # Tokens routed to each expert since the last collect_expert_load(); not checkpointed.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # At least fp32: routing decisions must not flip with the activation dtype.
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        scores = probs + self.expert_bias if self.use_bias_balancing else probs
        _, idx = scores.topk(self.top_k, dim=-1)
        weights = probs.gather(-1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # Counted once per forward: not again when activation checkpointing recomputes the layer.
        if not in_backward():
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(idx, self.num_experts).float()
        return logits, probs, idx, weights


class LocalTokenDispatcher:
    """Permutes token copies so that each expert's tokens are contiguous, and back.

    dispatch: x [N, D], idx [N, k] -> (x_sorted [M, D], tokens_per_expert [E_local] int64): the
    rows this process's experts compute, sorted by expert. Here M = N*k and E_local = E; an
    expert-parallel dispatcher returns the rows its local experts receive from every rank.
    combine:  y_sorted [N*k, D], weights [N, k] -> [N, D]
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = idx.flatten()
        self._order = flat.argsort(stable=True)
        self._shape = idx.shape
        counts = expert_counts(flat, self.num_experts)
        return x[self._order // idx.shape[1]], counts

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = self._shape
        y = torch.empty_like(y_sorted)
        y[self._order] = y_sorted
        y = y.view(n, k, -1) * weights.unsqueeze(-1).to(y.dtype)
        return y.sum(dim=1)


class GroupedExperts(nn.Module):
    """E SwiGLU experts computed as two grouped GEMMs over expert-sorted tokens.

    Weights in the released layout: gate_up_proj [E, 2I, D], down_proj [E, D, I].
    x [M, D] sorted by expert, tokens_per_expert [E] -> [M, D].
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        gate, up = grouped_matmul(x, self.gate_up_proj, offs).chunk(2, dim=-1)
        return grouped_matmul(F.silu(gate) * up, self.down_proj, offs)


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# F.grouped_mm where this torch makes it public; older releases have only torch._grouped_mm.
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x times w[e]^T, for all experts e in one call.

    x: [M, K], w: [E, N, K], offs: [E] int32 cumulative row counts -> [M, N] in x's dtype, or in
    the autocast dtype inside autocast.
    """
    if torch.is_autocast_enabled(x.device.type):  # autocast casts matmuls but not grouped_mm
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w = w.to(x.dtype)
    if x.shape[0] == 0:  # no rows (an expert-parallel rank that received none); keeps w in the graph
        return x @ w[0].T
    if x.dtype in GROUPED_MM_DTYPES:
        return grouped_mm(x, w.transpose(1, 2), offs=offs)
    # float64 (reference and gradient checks only): grouped_mm has no kernel, split per expert.
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.cat([xe @ we.T for xe, we in zip(x.split(sizes), w)])


class SparseMoE(nn.Module):
    """x [B, T, D] -> [B, T, D]; adds 'moe_aux' and 'moe_z' losses (sums over layers) to ctx."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.gate = TopKRouter(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.dispatcher = LocalTokenDispatcher(cfg.num_experts)

    def forward(self, x: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, idx, weights = self.gate(x)
        counts = expert_counts(idx, self.num_experts)  # this batch's routing
        x_sorted, tokens_per_expert = self.dispatcher.dispatch(x, idx)
        out = self.dispatcher.combine(self.experts(x_sorted, tokens_per_expert), weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        # Computed in a recompute too (it must save what the forward saved); the context adds them
        # once per forward (SequenceContext.add_aux_loss).
        lse = logits.logsumexp(dim=-1)
        if ctx.cp is None:
            aux, z = switch_load_balancing_loss(probs, counts, self.top_k), lse.square().mean()
        else:  # this rank's shares of the whole micro-batch's losses
            aux, z = moe_loss_shares(probs, counts, lse, self.top_k, ctx.cp)
        ctx.add_aux_loss("moe_aux", aux)
        ctx.add_aux_loss("moe_z", z)
        return out.view(shape)


def switch_load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e the share of routed token copies and P_e the mean router
    probability of expert e; equals 1 under perfect balance (HF's variant equals top_k there).

    probs: [N, E] fp32, counts: [E] -> scalar.
    """
    n, e = probs.shape
    f = counts.float() / max(n * top_k, 1)
    return e * (f * probs.mean(dim=0)).sum()


def routers(model: nn.Module) -> list[TopKRouter]:
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


@torch.no_grad()
def collect_expert_load(model: nn.Module) -> torch.Tensor | None:
    """[num_moe_layers, E] token counts since the last call (counters reset), or None without MoE."""
    rs = routers(model)
    if not rs:
        return None
    load = torch.stack([r.tokens_per_expert.clone() for r in rs])
    for r in rs:
        r.tokens_per_expert.zero_()
    return load


@torch.no_grad()
def update_router_bias(model: nn.Module, load: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower the others.

    load: [num_moe_layers, E], the counts of the step (summed over data-parallel ranks by the caller).
    """
    for r, layer_load in zip(routers(model), load):
        if r.use_bias_balancing:
            r.expert_bias += rate * torch.sign(layer_load.mean() - layer_load)
