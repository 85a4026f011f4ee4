"""Expert parallelism: the experts of every MoE block are split over the `ep` ranks, and an
all-to-all token dispatcher replaces the local one behind `SparseMoE.dispatcher`.

Per MoE layer and micro-batch, on each of the P ranks of the ep group (E experts, L = E / P local):

    dispatch: copies of the rank's N tokens (N*k rows), sorted by expert (optionally capped)
              -> all_to_all of the per-expert counts [E] -> [P, L]
              -> all_to_all of the rows (uneven splits; rank p gets the rows of experts pL..pL+L-1)
              -> received rows re-sorted from (source rank, expert) to (expert, source rank) order
    experts:  grouped SwiGLU over the L local experts' rows, on the plain local weight shards
    combine:  the exact reverse (unsort, all_to_all back, unpermute), then weight and sum over top-k

Both row all-to-alls are autograd functions whose backward is the reverse all-to-all, so the
gradient of a local expert collects the contributions of every ep rank's tokens.

Gradient scaling (the caller's job): each rank backpropagates its own loss L_r. After backward,
- a routed-expert weight shard holds d(sum_{r in ep group} L_r)/dW: already summed over ep ranks;
  reduce it only over the ranks that hold the *same* shard (the data-parallel ranks outside ep).
- every other parameter (router, shared expert, attention, ...) holds dL_r/dtheta and must be
  reduced over all data-parallel ranks, ep ranks included.
So if the loss is a per-rank mean and the dense grads are *averaged* over D data-parallel ranks,
the expert grads must be divided by D too (not by D / ep): averaging them over the D / ep ranks
outside ep leaves them ep times too large. With FSDP2 over the expert-data-parallel group, set that
unit's gradient divide factor to D.

Storage: gate_up_proj [E, 2I, D] and down_proj [E, D, I] stay registered as DTensors sharded
(Shard(0)) over the ep mesh, so FSDP2 and DCP see global shapes; `GroupedExperts.forward` computes
on their local shards [L, ...], swapped in by forward hooks (parallel/local_params.py, LocalCompute).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import parallelize_module

from model.moe import SparseMoE, expert_counts
from parallel import collectives
from parallel.local_params import LocalCompute
from parallel.spec import QWEN35_SPEC, ModuleSpec, ep_role

COMM_KEYS = ("tokens_sent", "tokens_received", "tokens_local", "counts_sent", "counts_received")


class _AllToAllRows(torch.autograd.Function):
    """Rows x [sum(send), ...] -> [sum(recv), ...]: send[p] rows go to rank p, recv[p] come from it.
    Backward is the same exchange reversed (grads go back to where the rows came from)."""

    @staticmethod
    def forward(ctx, x, send, recv, dispatcher, what):
        ctx.args = (send, recv, dispatcher, what)
        return dispatcher._exchange_rows(x, send, recv, what)

    @staticmethod
    def backward(ctx, grad):
        send, recv, dispatcher, what = ctx.args
        return dispatcher._exchange_rows(grad, recv, send, what + " backward"), None, None, None, None


class AllToAllTokenDispatcher:
    """Token dispatcher over an expert-parallel group: the all-to-all drop-in for
    `model.moe.LocalTokenDispatcher`, with P = group size ranks holding L = E / P experts each
    (rank p: experts p*L .. p*L+L-1).

    dispatch: x [N, D], idx [N, k] -> (x_local_sorted [M, D], tokens_per_local_expert [L] int64)
        x_local_sorted are the rows this rank's L experts must process (from every ep rank), sorted
        by local expert.
    combine: y_sorted [M, D], weights [N, k] -> [N, D], sum_j weights[:, j] * expert output of
        copy j (zero for dropped copies), as `LocalTokenDispatcher.combine`.

    capacity_factor None: dropless. c > 0: each expert keeps at most ceil(c * N * k / E) copies
    *from each source rank*, decided at the source before any exchange; the latest copies (in
    flattened [N, k] order, i.e. the later tokens) beyond it are dropped; dispatch does not see the
    routing weights, so there is no lowest-weight policy. `dropped_tokens` counts the dropped
    copies of this rank's tokens, cumulatively (once per forward, also under activation
    checkpointing); `collect_dropped_tokens` reads and resets it.

    Benchmark hook: `comm_bytes` accumulates the bytes this rank's all-to-alls moved, forward and
    backward, until `reset_comm_bytes()` (or `collect_comm_bytes(model)`):
        tokens_sent / tokens_received: token rows (and their grads) to / from *other* ranks;
        tokens_local: rows whose source and destination are this rank (a local copy, no link);
        counts_sent / counts_received: the int64 per-expert counts to / from other ranks.
    """

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup, capacity_factor: Optional[float] = None,
                 name: str = "moe"):
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"parallel.ep={self.ep_size} must divide model.num_experts={num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"parallel.expert_capacity_factor={capacity_factor} must be > 0 or null (dropless)")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.capacity_factor = capacity_factor
        self.name = name
        self.dropped_tokens = 0
        self.comm_bytes = dict.fromkeys(COMM_KEYS, 0)
        self.tokens_per_local_expert: Optional[torch.Tensor] = None

    def reset_comm_bytes(self) -> None:
        self.comm_bytes = dict.fromkeys(COMM_KEYS, 0)

    def _what(self, kind: str) -> str:
        return f"ep all_to_all {kind} ({self.name})"

    def _exchange_rows(self, x: torch.Tensor, send: list[int], recv: list[int], what: str) -> torch.Tensor:
        out = x.new_empty((sum(recv), *x.shape[1:]))
        collectives.all_to_all_single(out, x.contiguous(), recv, send, what, self.group)
        row = math.prod(x.shape[1:]) * x.element_size()
        me = self.ep_rank
        self.comm_bytes["tokens_sent"] += (sum(send) - send[me]) * row
        self.comm_bytes["tokens_received"] += (sum(recv) - recv[me]) * row
        self.comm_bytes["tokens_local"] += send[me] * row
        return out

    def uniform_counts(self, copies: int, capacity: Optional[int]) -> list[int]:
        """What `dispatch` reads to the host, [counts | send_counts | recv_counts] (3 x E ints), for
        `copies` token copies per rank routed as evenly as possible over the experts, the same on
        every rank: the stand-in of a rehearsal on fake tensors, whose routing has no values."""
        e, nl = self.num_experts, self.num_local_experts
        counts = [copies // e + (i < copies % e) for i in range(e)]
        send = counts if capacity is None else [min(c, capacity) for c in counts]
        # recv[p * nl + j]: from source rank p for local expert j; every source sends as this rank.
        recv = [send[self.ep_rank * nl + j] for _ in range(self.ep_size) for j in range(nl)]
        return counts + send + recv

    def dispatch(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = idx.shape
        p, nl = self.ep_size, self.num_local_experts
        flat = idx.flatten()
        order = flat.argsort(stable=True)           # copies grouped by expert = by destination rank
        counts = expert_counts(flat, self.num_experts)
        send_counts = counts
        capacity = None
        # A rehearsal on fake tensors (parallel/rehearse.py) has no routing to read: it takes the
        # split sizes of uniform routing instead. Real tensors never take this branch.
        rehearsal = is_fake(flat)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * n * k / self.num_experts)
            starts = counts.cumsum(0) - counts
            pos_in_expert = torch.arange(n * k, device=flat.device) - starts[flat[order]]
            keep = pos_in_expert < capacity  # stable sort: the latest copies go first
            order = (order[:sum(self.uniform_counts(n * k, capacity)[self.num_experts:2 * self.num_experts])]
                     if rehearsal else order[keep])
            send_counts = counts.clamp(max=capacity)

        recv_counts = torch.empty_like(send_counts)
        collectives.all_to_all_single(recv_counts, send_counts, None, None, self._what("counts"),
                                      self.group)
        counts_bytes = (p - 1) * nl * send_counts.element_size()
        self.comm_bytes["counts_sent"] += counts_bytes
        self.comm_bytes["counts_received"] += counts_bytes
        # One host sync for all the split sizes (dropless routing makes them data-dependent).
        host = (self.uniform_counts(n * k, capacity) if rehearsal
                else torch.cat([counts, send_counts, recv_counts]).tolist())
        e = self.num_experts
        if torch._C._current_graph_task_id() == -1:
            # Not an activation-checkpoint recompute inside backward: count each drop once.
            self.dropped_tokens += sum(host[:e]) - sum(host[e:2 * e])
        # Rows per peer rank: the send side by destination, the receive side by source.
        self._send = [sum(host[e + r * nl:e + (r + 1) * nl]) for r in range(p)]
        self._recv = [sum(host[2 * e + r * nl:2 * e + (r + 1) * nl]) for r in range(p)]

        x_recv = _AllToAllRows.apply(x[order // k], self._send, self._recv, self, self._what("tokens dispatch"))
        # Rows arrive grouped by (source rank, local expert); the experts want them by expert.
        local_expert = torch.arange(nl, device=x.device).repeat(p).repeat_interleave(
            recv_counts, output_size=x_recv.shape[0])
        self._local_order = local_expert.argsort(stable=True)
        self._order, self._shape = order, (n, k)
        self.tokens_per_local_expert = recv_counts.view(p, nl).sum(0)
        return x_recv[self._local_order], self.tokens_per_local_expert

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = self._shape
        y_recv = torch.empty_like(y_sorted)
        y_recv[self._local_order] = y_sorted
        y_back = _AllToAllRows.apply(y_recv, self._recv, self._send, self, self._what("tokens combine"))
        if self._order.numel() == n * k:
            y = torch.empty((n * k, y_back.shape[1]), dtype=y_back.dtype, device=y_back.device)
        else:                                   # dropped copies contribute zero
            y = y_back.new_zeros((n * k, y_back.shape[1]))
        y[self._order] = y_back
        y = y.view(n, k, -1) * weights.unsqueeze(-1).to(y.dtype)
        return y.sum(dim=1)


def moe_blocks(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, capacity_factor: Optional[float] = None,
                          spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> nn.Module:
    """Shards the modules of `model` whose spec row says `ep: experts` over the 1-D `ep_mesh` and
    installs an `AllToAllTokenDispatcher` in each enclosing MoE block (in place; returns `model`).
    No-op for an ep size of 1.

    gate_up_proj [E, 2I, D] and down_proj [E, D, I] become nn.Parameter(DTensor, [Shard(0)]): global
    shapes for FSDP2 / DCP, local shards [E/ep, ...] for compute. `GroupedExperts.num_experts`
    keeps the global E (its forward does not read it). Apply before FSDP2; works on a meta-built
    model. The router, shared expert and the rest stay replicated: see the module docstring for
    how their gradients must be reduced.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_expert_parallel wants a 1-D ep mesh, got {ep_mesh.ndim} dims "
                         f"{ep_mesh.mesh_dim_names}")
    if ep_mesh.size() == 1:
        return model
    group = ep_mesh.get_group()
    blocks = dict(moe_blocks(model))
    for name, experts in list(model.named_modules()):
        if ep_role(name, experts, spec) != "experts":
            continue
        moe_name = name.rpartition(".")[0]
        moe = blocks[moe_name]
        if moe.num_experts % ep_mesh.size():
            raise ValueError(f"parallel.ep={ep_mesh.size()} must divide model.num_experts={moe.num_experts} "
                             f"({moe_name})")
        if any(isinstance(p, DTensor) for p in experts.parameters()):
            raise ValueError(f"{name} already holds DTensors: apply expert parallelism once, "
                             f"before FSDP2")
        # DTensor storage, local compute: forward hooks show experts.forward the local shards.
        parallelize_module(experts, ep_mesh, LocalCompute({p: Shard(0) for p, _ in experts.named_parameters()}))
        moe.dispatcher = AllToAllTokenDispatcher(moe.num_experts, group, capacity_factor, name=moe_name)
    return model


def ep_dispatchers(model: nn.Module) -> list[AllToAllTokenDispatcher]:
    return [m.dispatcher for _, m in moe_blocks(model) if isinstance(m.dispatcher, AllToAllTokenDispatcher)]


def collect_dropped_tokens(model: nn.Module) -> Optional[torch.Tensor]:
    """[num_ep_moe_layers] int64: token copies of this rank dropped by the capacity since the last
    call (counters reset); None without EP dispatchers. Sum over ranks for the global count."""
    ds = ep_dispatchers(model)
    if not ds:
        return None
    out = torch.tensor([d.dropped_tokens for d in ds], dtype=torch.int64)
    for d in ds:
        d.dropped_tokens = 0
    return out


def collect_comm_bytes(model: nn.Module) -> dict[str, int]:
    """This rank's EP all-to-all bytes since the last call, summed over layers (counters reset);
    keys as `AllToAllTokenDispatcher.comm_bytes`."""
    total = dict.fromkeys(COMM_KEYS, 0)
    for d in ep_dispatchers(model):
        for key, value in d.comm_bytes.items():
            total[key] += value
        d.reset_comm_bytes()
    return total
