"""Emulated FP8 GEMMs on any device: the layers the policy picks become subclasses of their own
class (same parameters, same state-dict keys) whose forward, inside `fp8_autocast()`, runs

    y = Q_e4m3(x) @ Q_e4m3(W)^T                          (forward, "fprop")
    dx = Q_grad(dy) @ Q_e4m3(W)      dW = Q_grad(dy)^T @ Q_e4m3(x)    (backward: dgrad, wgrad)

with Q the recipe's quantise-dequantise (train/fp8_quant.py) and Q_grad e5m2 under the hybrid
format. The backward multiplies the FP8 copies saved by the forward, as a real FP8 GEMM does; for
block recipes the operands of dgrad/wgrad are quantised along *their* reduction dim (the
"columnwise" copies TE makes from the high-precision tensor). Outside `fp8_autocast()` the layers
compute exactly as the plain class (TE modules do the same outside `te.autocast`).

Delayed scaling keeps per-layer `fp8_amax_history` [L, ..., 3 roles, G] and `fp8_scale` buffers
(persistent: checkpointed and restored); roles are input, weight, output gradient; G = 1 for a
linear, one per expert for grouped experts (TE's GroupedLinear has one quantizer per GEMM too).

Activation checkpointing passes `checkpoint_contexts` as torch.utils.checkpoint's `context_fn`: the
recompute in backward then quantises with the forward's scales and records no amax, as TE's
checkpoint does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from model.moe import GROUPED_MM_DTYPES, GroupedExperts, grouped_matmul, grouped_mm
from train.fp8_config import PrecisionConfig
from train.fp8_quant import (E4M3, E5M2, Fp8Format, group_amax, per_tensor_scale, quantise_blocks_1d,
                             quantise_blocks_2d, quantise_scaled)

INPUT, WEIGHT, GRAD = 0, 1, 2
ROLES = ("input", "weight", "grad_output")
BLOCK = {"mxfp8": 32, "blockwise": 128}
FP8_ROW_ALIGN = 16  # FP8 GEMMs need row counts in multiples of 16 (per expert, for grouped ones)

_enabled = False
# Inside a checkpointed region: its forward appends the per-tensor scales it quantises with to
# _saving; its recompute takes them back from _replaying, in the same order.
_saving: Optional[list[torch.Tensor]] = None
_replaying: Optional[Iterator[torch.Tensor]] = None


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True):
    """Within it, the emulated FP8 layers quantise; outside they compute as their plain class."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def fp8_enabled() -> bool:
    return _enabled


def checkpoint_contexts() -> tuple[ContextManager, ContextManager]:
    """(forward context, recompute context) for one call of non-reentrant torch.utils.checkpoint
    (its `context_fn`; called at the start of the checkpointed forward). The forward keeps the
    scales of its per-tensor quantisations, in call order; the recompute in backward runs under
    the forward's fp8_autocast state (backward runs outside it), quantises with those scales and
    records no amax: a second record would roll the delayed-scaling history twice per step, and
    the scale it would read has since been updated. The list belongs to this one call, so the
    order stays right when a pipeline schedule runs several micro-batches' forwards before their
    backwards, and a recompute that stops early leaves nothing behind."""
    scales: list[torch.Tensor] = []
    return _checkpoint_phase(scales, None, _enabled), _checkpoint_phase(None, scales, _enabled)


@contextlib.contextmanager
def _checkpoint_phase(saving, replay, enabled):
    global _saving, _replaying, _enabled
    previous = _saving, _replaying, _enabled
    _saving, _replaying, _enabled = saving, None if replay is None else iter(replay), enabled
    try:
        yield
    finally:
        _saving, _replaying, _enabled = previous


@dataclass
class Quantiser:
    """One GEMM's quantisation: the recipe, plus for delayed scaling the GEMM's slices of its
    module's buffers, history [L, 3, G] and scale [3, G] (views: updates land in the buffers)."""

    recipe: str
    fp8_format: str
    margin: int = 0
    amax_compute_algo: str = "max"
    history: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    group: Any = None  # process group over which amaxes are max-reduced (None: local)
    # Expert parallelism: this rank computes experts offset .. offset + G - 1 of `total`.
    experts: Optional[tuple[int, int]] = None  # (offset, total)

    @property
    def per_tensor(self) -> bool:
        return self.recipe in ("delayed", "tensorwise")

    def fmt(self, role: int) -> Fp8Format:
        return E5M2 if role == GRAD and self.fp8_format == "hybrid" else E4M3

    def quantise(self, t: torch.Tensor, role: int, layout: str = "row",
                 row_groups: Optional[torch.Tensor] = None, num_groups: int = 1) -> torch.Tensor:
        """Dequantised FP8 copy of t. Weights: [N, K] or [E, N, K]; activations and gradients:
        [M, C] with optional row_groups [M] (the expert of each row). layout 'row' quantises for a
        GEMM reducing over the last dim, 'col' over dim -2 (block recipes only)."""
        fmt = self.fmt(role)
        if self.recipe == "mxfp8" or (self.recipe == "blockwise" and role != WEIGHT):
            return quantise_blocks_1d(t, fmt, BLOCK[self.recipe], dim=-1 if layout == "row" else -2)
        if self.recipe == "blockwise":
            return quantise_blocks_2d(t, fmt, BLOCK["blockwise"])
        with torch.no_grad():
            if _replaying is not None:  # activation-checkpoint recompute: the forward's scale
                scale = next(_replaying, None)
                if scale is None:
                    raise RuntimeError("emulated FP8: a checkpointed recompute quantised more "
                                       "tensors than its forward")
            else:
                amax = self._amax(t, role, row_groups, num_groups)
                if self.recipe == "tensorwise":
                    scale = per_tensor_scale(amax, fmt, self.margin)
                else:
                    scale = self.scale[role].clone()
                    self._record(role, amax, fmt)
                if self.experts is not None:  # the scales of this rank's experts
                    local = t.shape[0] if role == WEIGHT else num_groups  # weights: [L, N, K]
                    scale = scale[self.experts[0]:self.experts[0] + local]
                if _saving is not None:
                    _saving.append(scale)
        return quantise_scaled(t, self._broadcast(scale, t, role, row_groups), fmt)

    def _amax(self, t, role, row_groups, num_groups) -> torch.Tensor:
        if role == WEIGHT:
            amax = t.detach().abs().amax(dim=(-2, -1)).float().reshape(-1)
        else:
            amax = group_amax(t, row_groups, num_groups)
        if self.experts is not None:
            # Every expert's amax in its global slot, zeros elsewhere: the max over the ranks is
            # then each expert's amax over the ranks that ran it, and the state stays the same
            # (all E experts) on every rank, as without expert parallelism.
            offset, total = self.experts
            amax = amax.new_zeros(total).index_copy_(
                0, torch.arange(offset, offset + amax.numel(), device=amax.device), amax)
        if self.group is not None and dist.is_initialized():
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax

    @staticmethod
    def _broadcast(scale, t, role, row_groups) -> torch.Tensor:
        if role == WEIGHT and t.dim() == 3:
            return scale.view(-1, 1, 1)
        if row_groups is not None:
            return scale[row_groups].unsqueeze(-1)
        return scale[0]

    def _record(self, role: int, amax: torch.Tensor, fmt: Fp8Format) -> None:
        """Delayed scaling: push this step's amax into the history; the next step's scale is
        fp8_max / (max or most recent amax of the history) / 2**margin."""
        h = self.history[:, role]
        h.copy_(torch.roll(h, 1, dims=0))
        h[0] = amax
        new = h.amax(dim=0) if self.amax_compute_algo == "max" else h[0]
        self.scale[role].copy_(per_tensor_scale(new, fmt, self.margin, previous=self.scale[role]))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, qz: Quantiser, dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            xq = qz.quantise(x2, INPUT).to(dtype)
            wq = qz.quantise(weight, WEIGHT).to(dtype)
            y = xq @ wq.T
            if bias is not None:
                y = y + bias.to(dtype)
            if qz.per_tensor:
                xc, wc = xq, wq
            else:
                xc = qz.quantise(x2, INPUT, "col").to(dtype)
                wc = qz.quantise(weight, WEIGHT, "col").to(dtype)
        ctx.save_for_backward(xc, wc)
        ctx.qz, ctx.dtype, ctx.has_bias = qz, dtype, bias is not None
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        qz, dtype = ctx.qz, ctx.dtype
        dy2 = dy.reshape(-1, dy.shape[-1])
        gr = qz.quantise(dy2, GRAD).to(dtype)
        gc = gr if qz.per_tensor else qz.quantise(dy2, GRAD, "col").to(dtype)
        dx = (gr @ wc).view(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw = (gc.T @ xc).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0).to(ctx.w_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def grouped_wgrad(g: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group g_e^T x_e: g [M, N], x [M, K], offs [E] cumulative rows -> [E, N, K]."""
    if g.dtype in GROUPED_MM_DTYPES:
        return grouped_mm(g.T, x, offs=offs)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.stack([ge.T @ xe for ge, xe in zip(g.split(sizes), x.split(sizes))])


class _Fp8GroupedFn(torch.autograd.Function):
    """x [M, K] sorted by expert (groups padded to the recipe's alignment), w [E, N, K]."""

    @staticmethod
    def forward(ctx, x, w, offs, row_groups, qz: Quantiser):
        e = w.shape[0]
        xq = qz.quantise(x, INPUT, "row", row_groups, e)
        wq = qz.quantise(w, WEIGHT).to(x.dtype)
        y = grouped_matmul(xq, wq, offs)
        if qz.per_tensor:
            xc, wc = xq, wq
        else:
            xc = qz.quantise(x, INPUT, "col", row_groups, e)
            wc = qz.quantise(w, WEIGHT, "col")
        # Saved in the dtype the forward GEMM ran in (bf16 under autocast, as dy will be).
        ctx.save_for_backward(xc.to(y.dtype), wc.to(y.dtype), offs, row_groups)
        ctx.qz, ctx.w_dtype = qz, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc, offs, row_groups = ctx.saved_tensors
        qz, e = ctx.qz, wc.shape[0]
        dy = dy.contiguous()
        gr = qz.quantise(dy, GRAD, "row", row_groups, e)
        gc = gr if qz.per_tensor else qz.quantise(dy, GRAD, "col", row_groups, e)
        dx = grouped_matmul(gr, wc.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        dw = grouped_wgrad(gc, xc, offs).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None


def pad_groups(x: torch.Tensor, counts: torch.Tensor, align: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad every group of rows of x [M, D] (groups of counts[e] rows, in order) with zero rows to
    a multiple of `align`: FP8 GEMMs need aligned row counts, and block scales must not straddle
    two experts. -> (x_pad [M', D], counts_pad [E], dest [M]: row i of x is row dest[i] of x_pad)."""
    counts = counts.to(torch.long)
    counts_p = (counts + align - 1) // align * align
    starts = torch.cumsum(counts, 0) - counts
    starts_p = torch.cumsum(counts_p, 0) - counts_p
    e = counts.numel()
    gid = torch.repeat_interleave(torch.arange(e, device=x.device), counts, output_size=x.shape[0])
    dest = starts_p[gid] + torch.arange(x.shape[0], device=x.device) - starts[gid]
    x_pad = x.new_zeros(int(counts_p.sum()), x.shape[1]).index_copy(0, dest, x)
    return x_pad, counts_p, dest


class _Fp8Module:
    """Mixin: the precision options and the delayed-scaling buffers of one swapped module."""

    def _setup_fp8(self, p: PrecisionConfig, buffer_shape: tuple[int, ...], group=None) -> None:
        self.fp8_recipe, self.fp8_format, self.fp8_group = p.recipe, p.fp8_format, group
        self.fp8_margin, self.fp8_amax_compute_algo = p.margin, p.amax_compute_algo
        if p.recipe == "delayed":
            device = next(self.parameters()).device
            # Persistent: the history and scales are training state; a resume must continue them.
            self.register_buffer("fp8_amax_history",
                                 torch.zeros(p.amax_history_len, *buffer_shape, device=device))
            self.register_buffer("fp8_scale", torch.ones(*buffer_shape, device=device))

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The delayed-scaling state of a fresh run (parallel/materialize.py calls this after
        `to_empty`): an empty amax history, unit scales."""
        if self.fp8_recipe == "delayed":
            for buf, value in ((self.fp8_amax_history, 0.0), (self.fp8_scale, 1.0)):
                (buf.to_local() if isinstance(buf, DTensor) else buf).fill_(value)

    def _quantiser(self, index: Optional[int] = None, experts: Optional[tuple[int, int]] = None) -> Quantiser:
        qz = Quantiser(self.fp8_recipe, self.fp8_format, self.fp8_margin, self.fp8_amax_compute_algo,
                       group=self.fp8_group, experts=experts)
        if self.fp8_recipe == "delayed":
            # Tensor-parallel styles turn a module's buffers into replicated DTensors: the state is
            # updated in place through their local tensors (same storage).
            h, s = (b.to_local() if isinstance(b, DTensor) else b
                    for b in (self.fp8_amax_history, self.fp8_scale))
            qz.history, qz.scale = (h, s) if index is None else (h[:, index], s[index])
        return qz

    def extra_repr(self) -> str:
        own = f"fp8={self.fp8_recipe}/{self.fp8_format} (emulated)"
        return ", ".join(s for s in (super().extra_repr(), own) if s)


class EmulatedFp8Linear(_Fp8Module, nn.Linear):
    """nn.Linear with an emulated FP8 GEMM inside `fp8_autocast()`. x [..., K] -> [..., N]."""

    def setup_fp8(self, p: PrecisionConfig, group=None) -> None:
        self._setup_fp8(p, (3, 1), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _enabled:
            return super().forward(x)
        if isinstance(self.weight, DTensor):
            return self._tensor_parallel_forward(x)
        return _Fp8LinearFn.apply(x, self.weight, self.bias, self._quantiser(), _compute_dtype(x))

    def _tensor_parallel_forward(self, x: DTensor) -> DTensor:
        """Under a column- or row-parallel plan (weight Shard(0) / Shard(1)): the FP8 GEMM of this
        rank's shard. The amaxes are max-reduced over the amax group, so a per-tensor scale is the
        whole tensor's, as without tensor parallelism."""
        if self.bias is not None:
            raise NotImplementedError("emulated FP8 under tensor parallelism: linear layers with a "
                                      "bias are not sharded by the plans")
        column = self.weight.placements[0] == Shard(0)
        # Column-parallel: the input is replicated and its gradient a partial sum over the ranks.
        x_local = x.to_local(grad_placements=[Partial()] if column else None)
        y = _Fp8LinearFn.apply(x_local, self.weight.to_local(), None, self._quantiser(),
                               _compute_dtype(x_local))
        return DTensor.from_local(y, self.weight.device_mesh,
                                  [Shard(y.dim() - 1)] if column else [Partial()], run_check=False)


class EmulatedFp8GroupedExperts(_Fp8Module, GroupedExperts):
    """GroupedExperts whose two grouped GEMMs run emulated FP8 inside `fp8_autocast()`, on
    expert groups padded to the recipe's alignment. x [M, D], tokens_per_expert [E] -> [M, D]
    (under expert parallelism: this rank's experts' rows and counts).

    The per-expert delayed-scaling state covers all E experts on every rank, also under expert
    parallelism, where each rank computes E / ep of them: amaxes are exchanged in their global
    slots (`Quantiser.experts`), so the state is the same on every rank and a checkpoint moves
    between ep sizes as it is."""

    def _local_experts(self) -> Optional[tuple[int, int]]:
        """(offset, E) when the experts are sharded over an expert-parallel mesh, else None.
        The parameter registered stays the DTensor (parallel/local_params.py shows forward the
        local shard), whose placement gives this rank's first expert."""
        p = self._parameters["gate_up_proj"]
        if not isinstance(p, DTensor):
            return None
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return (offset[0], self.num_experts) if p.to_local().shape[0] != self.num_experts else None

    def setup_fp8(self, p: PrecisionConfig, group=None) -> None:
        self._setup_fp8(p, (2, 3, self.num_experts), group)  # [gate_up | down, role, expert]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if not _enabled:
            return super().forward(x, tokens_per_expert)
        align = max(FP8_ROW_ALIGN, BLOCK.get(self.fp8_recipe, 1))
        xp, counts, dest = pad_groups(x, tokens_per_expert, align)
        offs = counts.cumsum(0).to(torch.int32)
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts,
                                       output_size=xp.shape[0])
        experts = self._local_experts()
        gate, up = _Fp8GroupedFn.apply(xp, self.gate_up_proj, offs, rows,
                                       self._quantiser(0, experts)).chunk(2, -1)
        out = _Fp8GroupedFn.apply(F.silu(gate) * up, self.down_proj, offs, rows, self._quantiser(1, experts))
        return out[dest]


def swap_to_emulated(module: nn.Module, p: PrecisionConfig, group=None) -> nn.Module:
    """Turn a plain nn.Linear or GroupedExperts into its emulated-FP8 subclass in place (same
    object, parameters and names; buffers added for delayed scaling)."""
    if type(module) is nn.Linear:
        module.__class__ = EmulatedFp8Linear
    elif type(module) is GroupedExperts:
        module.__class__ = EmulatedFp8GroupedExperts
    else:
        raise TypeError(f"emulated FP8 swaps nn.Linear and GroupedExperts, not {type(module).__name__}")
    module.setup_fp8(p, group)
    return module
