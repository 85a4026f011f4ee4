"""DTensor storage, local compute: the parallel style for modules whose math runs on plain tensors.

The model's mixers compute on plain tensors (reshapes by head count, the delta-rule kernel, the conv
window); a DTensor inside them would either fail or silently redistribute. `LocalCompute` keeps the
parameters registered as DTensors, which is what FSDP2 shards and what DCP saves with their global
shapes, and lets the module's forward see their local shards:

- a forward pre-hook puts each parameter's local tensor into its owner's instance ``__dict__``, where
  attribute lookup finds it before ``nn.Module.__getattr__`` consults ``_parameters``; a forward hook
  (also run on exceptions) removes it again. Under FSDP2 the pre-hook runs after FSDP has unsharded
  the parameters of the enclosing layer, so it sees the unsharded (tensor-parallel) DTensors.
- DTensor inputs are redistributed to what the module needs and handed over as local tensors.
  ``partial_input_grad=True`` declares that the module's work is split over the mesh (each rank owns
  some heads), so the gradient it returns for a replicated input is a partial sum, reduced by the
  input's redistribution in backward (an all-reduce, or a reduce-scatter under sequence parallelism).

Placements per parameter: ``Shard(d)`` (each rank owns a slice), ``Replicate()`` (the same value, and
the same gradient, on every rank), or ``Partial()``, used here to mean a replicated value whose
per-rank gradients are partial sums (a norm weight shared by all heads, applied to the local heads):
its gradient is all-reduced over the mesh in backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over `group`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    for p in path:
        module = getattr(module, p)
    return module, attr


class LocalCompute(ParallelStyle):
    """params: {dotted parameter name under the module: placement}. input_layouts: the placement to
    bring each positional tensor input to before handing it over locally (None leaves a plain tensor
    alone); inputs that are already DTensors are redistributed, plain tensors are taken as given."""

    def __init__(self, params: dict[str, Placement], *,
                 input_layouts: Optional[Sequence[Optional[Placement]]] = None,
                 partial_input_grad: bool = False):
        super().__init__()
        self.params = dict(params)
        self.input_layouts = tuple(input_layouts) if input_layouts is not None else None
        self.partial_input_grad = partial_input_grad

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        views: list[tuple[nn.Module, str, Optional[object]]] = []
        for name, placement in self.params.items():
            owner, attr = _owner(module, name)
            p = owner._parameters[attr]
            if isinstance(placement, Shard):
                d = distribute_tensor(p.data, device_mesh, [placement])
            else:  # Replicate and Partial: every rank already holds the same value (same seed)
                d = DTensor.from_local(p.data, device_mesh, [Replicate()], run_check=False)
            owner.register_parameter(attr, nn.Parameter(d, requires_grad=p.requires_grad))
            views.append((owner, attr, group if isinstance(placement, Partial) else None))

        def pre_hook(mod, args):
            for owner, attr, sum_group in views:
                p = owner._parameters[attr]
                local = p.to_local() if isinstance(p, DTensor) else p
                if sum_group is not None and local.requires_grad:
                    local = _SumGradOverGroup.apply(local, sum_group)
                owner.__dict__[attr] = local
            return self._prepare_inputs(args)

        def post_hook(mod, args, output):
            for owner, attr, _ in views:
                owner.__dict__.pop(attr, None)
            return output

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(post_hook, always_call=True)
        return module

    def _prepare_inputs(self, args: tuple) -> tuple:
        out = []
        for i, x in enumerate(args):
            layout = self.input_layouts[i] if self.input_layouts and i < len(self.input_layouts) else None
            if isinstance(x, DTensor):
                if layout is not None and x.placements != (layout,):
                    x = x.redistribute(placements=[layout])
                grad = [Partial()] if self.partial_input_grad else None
                x = x.to_local(grad_placements=grad)
            out.append(x)
        return tuple(out)
