"""Context parallelism, the plan: the model's CP seam (`Qwen35LM.cp_comm`, model/context_parallel.py)
given the collectives of this rank's CP group.

Every rank of a CP group reads the same micro-batches (the loader's dp rank is equal across cp);
the model runs its own contiguous slice of each, and the parameters' gradients are this rank's
shares, which FSDP's reduce-scatter over dp_shard x cp adds up (parallel/fsdp.py sums). Loss values
come back whole on every CP rank, so the trainer reduces them over the data-parallel ranks only.

The spec's `cp` roles (parallel/spec.py) say which modules communicate over the group and how:
`kv_gather` (gated attention: K and V all-gathered, one collective per layer), `state_passing`
(Gated DeltaNet: the conv halo and the [S0 | M] summaries, two all-gathers per layer, sizes
independent of T) and `loss_shares` (MoE blocks: the expert counts all-reduced for the balancing loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from model.language_model import Qwen35LM
from parallel import collectives

GATHER_NAME = "context_parallel.all_gather"
REDUCE_NAME = "context_parallel.all_reduce"


class _AllGather(torch.autograd.Function):
    """x [n, ...] -> [size * n, ...] in rank order. Backward: every rank's gradient of this rank's
    rows, summed (an all-reduce and a slice: gloo has no reduce-scatter of tensors)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: "GroupComm") -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty(comm.size * x.shape[0], *x.shape[1:])
        collectives.all_gather_single(out, x, GATHER_NAME, comm.group)
        ctx.comm, ctx.n = comm, x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        collectives.all_reduce(grad, GATHER_NAME + ".backward", ctx.comm.group)
        r = ctx.comm.rank
        return grad[r * ctx.n:(r + 1) * ctx.n], None


class GroupComm:
    """model.context_parallel.CPComm over a process group."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return _AllGather.apply(x, self)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone()
        return collectives.all_reduce(out, REDUCE_NAME, self.group)


def apply_context_parallel(model: Qwen35LM, cp_mesh: DeviceMesh) -> GroupComm:
    """Give the model (or a pipeline stage holding its `cp_comm`) the CP group's collectives."""
    comm = GroupComm(cp_mesh.get_group())
    model.cp_comm = comm
    return comm


@torch.no_grad()
def sum_over_cp(t: torch.Tensor, cp_mesh) -> torch.Tensor:
    """t summed over the CP group (per-rank counts such as the expert load); t itself without CP."""
    if cp_mesh is None:
        return t
    out = t.clone()
    return collectives.all_reduce(out, REDUCE_NAME, cp_mesh.get_group())
