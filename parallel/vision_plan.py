"""The decoupled vision plan: the ViT runs data-parallel over the ranks of the language TP group.

Every rank of that group holds the same micro-batch. Under `balanced`, each rank encodes only its
share of the call's images and videos (balanced by patch count, with the full ViT), and the merged
embeddings are all-gathered back into item order, so the caller (`Qwen35LM.embed`) sees exactly the
tensor the unsharded encoder returns. Under `replicated` every rank encodes everything (the baseline).

Gradients. The language-model loss is the same on every TP rank, so the gradient arriving at the
gathered embeddings is the same on every rank: the all-gather's backward keeps the local rows (no
communication), and each rank's ViT parameters receive the gradient of *its own items only*. The
ViT parameter gradients are therefore partial and must be summed over the group; see
`reduce_vision_grads` for the two ways the caller can owe that sum.

The plan is applied from outside the module: the encoder's class is swapped for a subclass that
only overrides `forward` (as FSDP2 does), so parameter names and state-dict keys are unchanged.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from model.vision import VisionEncoder, grid_list
from parallel import collectives

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

PLANS = ("balanced", "replicated")
# The names the collectives carry in profiler traces and errors (parallel/collectives.py).
GATHER_NAME = "vision_plan.all_gather_embeddings"


@dataclass
class VisionPlanStats:
    """What the plan did: the last call's balance and the bytes its collectives moved.

    Bytes are counted, not estimated. `allgather_bytes` is the all-gather's output buffer on one rank
    (world x the largest share's rows x D x element size, padding included: gloo needs equal sizes);
    a ring all-gather sends and receives (world-1)/world of it per rank. Its backward moves nothing.
    """

    patches_per_rank: list[int] = field(default_factory=list)   # last call
    items_per_rank: list[int] = field(default_factory=list)     # last call
    allgather_bytes: int = 0            # last call
    allgather_bytes_total: int = 0      # since reset()
    grad_allreduce_bytes_total: int = 0  # reduce_vision_grads, since reset()
    calls: int = 0                      # since reset()

    @property
    def patch_imbalance(self) -> float:
        """max / mean patches per rank of the last call (1.0 = perfect; 1.0 when nothing was encoded).
        Log it as `vision_patch_imbalance`."""
        total = sum(self.patches_per_rank)
        if total == 0:
            return 1.0
        return max(self.patches_per_rank) * len(self.patches_per_rank) / total

    def reset(self) -> None:
        self.allgather_bytes_total = self.grad_allreduce_bytes_total = self.calls = 0


@dataclass
class VisionPlan:
    """The state the balanced encoder carries: its group and its statistics."""

    group: Optional[dist.ProcessGroup]
    rank: int
    world: int
    stats: VisionPlanStats = field(default_factory=VisionPlanStats)


def assign_items(patches: Sequence[int], world: int) -> list[list[int]]:
    """Greedy largest-first onto the least-loaded rank. -> per rank, its item indices ascending.

    Deterministic (ties: lower item index first, then lower rank), so every rank computes the same
    assignment from the same grid_thw without communicating.
    """
    shares: list[list[int]] = [[] for _ in range(world)]
    heap = [(0, r) for r in range(world)]  # (load, rank): heapq pops the least load, then lowest rank
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + patches[i], r))
    return [sorted(s) for s in shares]


class _GatherItems(torch.autograd.Function):
    """local [n_local, D] -> [n_total, D] in item order, on every rank of the group.

    backward: the rows of the local items, taken from the output gradient, which the plan's
    contract makes identical on all ranks (no reduction, no communication)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, plan: VisionPlan, src_index: torch.Tensor,
                local_index: torch.Tensor, max_rows: int) -> torch.Tensor:
        send = local.new_zeros(max_rows, local.shape[1])
        send[: local.shape[0]] = local
        recv = local.new_empty(plan.world * max_rows, local.shape[1])
        collectives.all_gather_single(recv, send, GATHER_NAME, plan.group)
        plan.stats.allgather_bytes = recv.numel() * recv.element_size()
        plan.stats.allgather_bytes_total += plan.stats.allgather_bytes
        ctx.save_for_backward(local_index)
        return recv.index_select(0, src_index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (local_index,) = ctx.saved_tensors
        return grad.index_select(0, local_index), None, None, None, None


def _gather_indices(rows: list[int], shares: list[list[int]], max_rows: int, rank: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maps between the padded rank-major gather buffer and the item-ordered output.

    rows[i]: merged rows of item i. -> src_index [n_total] (buffer row of each output row) and
    local_index [n_local] (output row of each row of this rank's local output)."""
    m = len(rows)
    src_start, out_start = [0] * m, [0] * m
    for r, share in enumerate(shares):
        offset = r * max_rows
        for i in share:
            src_start[i] = offset
            offset += rows[i]
    acc = 0
    for i in range(m):
        out_start[i] = acc
        acc += rows[i]

    def expand(starts: list[int], items: list[int]) -> torch.Tensor:
        counts = torch.tensor([rows[i] for i in items], dtype=torch.long, device=device)
        begin = torch.tensor([starts[i] for i in items], dtype=torch.long, device=device)
        n = int(counts.sum())
        first = torch.cumsum(counts, 0) - counts  # position of each item's first row in the result
        within = torch.arange(n, device=device) - first.repeat_interleave(counts, output_size=n)
        return begin.repeat_interleave(counts, output_size=n) + within

    return expand(src_start, list(range(m))), expand(out_start, shares[rank])


class BalancedVisionMixin:
    """Overrides `VisionEncoder.forward` only: encode this rank's share, all-gather, restore order.

    Same signature and result as the unsharded encoder: pixel_values [N, C*Tp*P*P], grid_thw [M, 3]
    -> merged tokens [N / merge_unit, D_llm], items in grid_thw order."""

    vision_plan: VisionPlan

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        plan = self.vision_plan
        grids = grid_list(grid_thw)
        patches = [t * h * w for t, h, w in grids]
        if pixel_values.shape[0] != sum(patches):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw "
                             f"{grids} describes {sum(patches)}")
        shares = assign_items(patches, plan.world)
        plan.stats.patches_per_rank = [sum(patches[i] for i in s) for s in shares]
        plan.stats.items_per_rank = [len(s) for s in shares]
        plan.stats.calls += 1
        mine = shares[plan.rank]
        if mine:
            starts = [0, *itertools.accumulate(patches)]
            pixels = torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in mine])
            local = super().forward(pixels, grid_thw[mine])
        else:  # the tower on zero patches, as its peers' (see VisionEncoder.forward)
            local = super().forward(pixel_values[:0], grid_thw[:0])
        rows = [p // self.cfg.merge_unit for p in patches]
        max_rows = max(sum(rows[i] for i in s) for s in shares)
        if max_rows == 0:  # a call without items: every rank knows it, nothing to gather
            return local
        src_index, local_index = _gather_indices(rows, shares, max_rows, plan.rank, local.device)
        return _GatherItems.apply(local, plan, src_index, local_index, max_rows)



_BALANCED_CLASSES: dict[type, type] = {}


def _balanced_class(cls: type) -> type:
    if issubclass(cls, BalancedVisionMixin):
        return cls
    if cls not in _BALANCED_CLASSES:
        _BALANCED_CLASSES[cls] = type(f"Balanced{cls.__name__}", (BalancedVisionMixin, cls), {})
    return _BALANCED_CLASSES[cls]


def find_vision_encoder(model: nn.Module) -> Optional[VisionEncoder]:
    """The model's VisionEncoder (`model.visual`, the model itself, or the first one found), or None."""
    if isinstance(model, VisionEncoder):
        return model
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionEncoder):
        return visual
    return next((m for m in model.modules() if isinstance(m, VisionEncoder)), None)


def _resolve_group(group_or_mesh) -> Optional[dist.ProcessGroup]:
    if group_or_mesh is None or isinstance(group_or_mesh, dist.ProcessGroup):
        return group_or_mesh
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group_or_mesh, DeviceMesh):
        if group_or_mesh.ndim != 1:
            raise ValueError(f"the vision plan needs a 1-D mesh (the language TP group, e.g. "
                             f"mesh['tp']); got one with dims {group_or_mesh.mesh_dim_names}")
        return group_or_mesh.get_group()
    raise TypeError(f"expected a ProcessGroup, a 1-D DeviceMesh or None, got {type(group_or_mesh)}")


def apply_vision_plan(model: nn.Module,
                      group_or_mesh: Union[dist.ProcessGroup, "DeviceMesh", None] = None,
                      name: str = "balanced") -> Optional[VisionPlan]:
    """Apply `parallel.vision.name` to the model's vision encoder, in place.

    group_or_mesh: the language model's tensor-parallel group (a ProcessGroup or a 1-D DeviceMesh;
    None = the default group). Every rank of it must call the encoder with the same batch.
    -> the VisionPlan (its `stats` hold the balance and byte counts), or None when nothing changed:
    `replicated`, a group of size 1, no process group, or a model without a vision encoder (a text
    model, a pipeline stage other than the first).
    Apply it before FSDP (`fully_shard` keeps the swapped class's forward; the other order works too).
    The caller owes the reduction of the ViT gradients: see `reduce_vision_grads`.
    """
    if name not in PLANS:
        raise ValueError(f"parallel.vision.name={name!r} is not one of {PLANS}")
    encoder = find_vision_encoder(model)
    if name == "replicated" or encoder is None or not dist.is_initialized():
        return None
    group = _resolve_group(group_or_mesh)
    world = dist.get_world_size(group)
    if world == 1:
        return None
    plan = VisionPlan(group=group, rank=dist.get_rank(group), world=world)
    encoder.vision_plan = plan
    encoder.__class__ = _balanced_class(type(encoder))
    return plan


def vision_plan_of(model: nn.Module) -> Optional[VisionPlan]:
    """The balanced plan applied to the model's encoder (for its stats), or None."""
    encoder = find_vision_encoder(model)
    return getattr(encoder, "vision_plan", None) if encoder is not None else None


@torch.no_grad()
def reduce_vision_grads(model: nn.Module, group: Optional[dist.ProcessGroup] = None,
                        bucket_bytes: int = 64 << 20) -> int:
    """SUM the ViT parameter gradients over the plan's group (after backward, before clipping and
    the optimizer step; once per step is enough under gradient accumulation, the sum is linear).

    Under `balanced` each rank's ViT gradient holds only its own items' contribution; the sum over
    the group is the gradient of the unsharded model. The caller owes exactly one of:
      (a) this call, with the ViT replicated over the group (FSDP, if any, shards it over
          dp_shard only: FSDP then averages over dp as for every other parameter), or
      (b) FSDP sharding the ViT over a mesh that includes the group (dp_shard x tp flattened) with
          `set_gradient_divide_factor(dp_shard size)` on that unit: its reduce-scatter then sums
          over tp and averages over dp. Do not call this function then.
    A no-op (returns 0) when no balanced plan is applied (`replicated`: the grads are already whole).
    Parameters without a gradient are skipped; whether a gradient exists is the same on every rank
    of the group (same batch; ranks without items run the tower on zero patches and get zero gradients).
    DTensor gradients (FSDP over dp_shard) are reduced shard by shard: TP peers hold the same shard.
    -> bytes all-reduced (also added to the plan's stats).
    """
    plan = vision_plan_of(model)
    if plan is None:
        return 0
    group = plan.group if group is None else group
    moved = 0
    # Buckets of one dtype and device: the whole ViT in a few collectives, not one per tensor.
    buckets: dict[tuple, tuple[list[torch.Tensor], int]] = {}
    for p in find_vision_encoder(model).parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        key = (g.dtype, g.device)
        tensors, size = buckets.get(key, ([], 0))
        tensors.append(g)
        buckets[key] = (tensors, size + g.numel() * g.element_size())
        if buckets[key][1] >= bucket_bytes:
            moved += _all_reduce_flat(buckets.pop(key)[0], group)
    for tensors, _ in buckets.values():
        moved += _all_reduce_flat(tensors, group)
    plan.stats.grad_allreduce_bytes_total += moved
    return moved


def _all_reduce_flat(tensors: list[torch.Tensor], group) -> int:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collectives.all_reduce(flat, "vision_plan.all_reduce_grads", group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
    return flat.numel() * flat.element_size()
