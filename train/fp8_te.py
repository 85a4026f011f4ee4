"""The Transformer Engine FP8 backend (CUDA only). Imported only when precision.backend == 'te';
transformer_engine itself is imported inside the functions: it needs CUDA libraries, and a
half-installed TE breaks at import.

- Each chosen nn.Linear becomes a te.Linear (weights copied; TE names its parameters `weight`
  and `bias` too, so the state-dict keys stay, plus `<module>._extra_state`: TE's FP8 scaling state,
  i.e. delayed scaling's amax histories and scales, saved and restored with the checkpoint).
- Each chosen GroupedExperts becomes a TEGroupedExperts: the stacked `gate_up_proj` / `down_proj`
  parameters stay (names, checkpoint layout and optimizer state unchanged) and every forward
  hands TE's GroupedLinear per-expert views of them, on expert groups padded to 16 rows (32 for
  MXFP8) as FP8 GEMMs require.
- The forward runs under TE's autocast (`te.autocast`, or `te.fp8_autocast` on TE versions
  before the rename) with the recipe from config and the caller's amax reduction group;
  `checkpoint_contexts` makes activation checkpointing's recompute reuse the forward's scales.

Checked against TE's source (module/linear.py, module/grouped_linear.py, module/base.py,
quantization.py / fp8.py, distributed.py, common/recipe); tests/test_fp8_te.py checks the wiring
on CPU against a fake TE with the same signatures, benchmarks/gpu_check.py runs it on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.moe import GroupedExperts
from train.fp8_config import PrecisionConfig
from train.fp8_emulated import FP8_ROW_ALIGN, pad_groups

# Our recipe name -> (TE recipe class, TE's availability check for it).
TE_RECIPES = {"delayed": ("DelayedScaling", "is_fp8_available"),
              "tensorwise": ("Float8CurrentScaling", "is_fp8_available"),
              "mxfp8": ("MXFP8BlockScaling", "is_mxfp8_available"),
              "blockwise": ("Float8BlockScaling", "is_fp8_block_scaling_available")}
# Rows (tokens, per expert for grouped GEMMs) and weight dims an FP8 GEMM operand must be a
# multiple of: 32 for MXFP8, which scales blocks of 32 along both dims of each operand (TE's
# MXFP8Quantizer.is_quantizable), 16 for the others (TE's assert_dim_for_fp8_exec asks 8 x 16).
TE_ALIGN = {"mxfp8": 32}


def check_device(device: torch.device) -> None:
    """TE runs on CUDA GPUs only. (The CPU tests of the wiring replace this check.)"""
    if not torch.cuda.is_available():
        raise RuntimeError("precision.backend='te' needs a CUDA GPU and none is visible; use "
                           "precision=fp8_emulated to run the FP8 policy on CPU")
    if device.type != "cuda":
        raise RuntimeError(f"precision.backend='te' needs train.device=cuda, the model is on {device}")


def import_te():
    """transformer_engine.pytorch, or a RuntimeError that says what to do."""
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # ImportError, or a broken install failing to load its libraries
        raise RuntimeError(f"precision.backend='te': cannot import transformer_engine.pytorch "
                           f"({type(e).__name__}: {e}); install it with `pip install -e '.[te]'` "
                           f"on a CUDA machine, or use precision=fp8_emulated") from None
    return te


def _state_manager():
    """TE's FP8GlobalStateManager (in quantization.py on newer TE, fp8.py on older)."""
    try:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    return FP8GlobalStateManager


def te_layout_error(tp: int, ep: int, grouped_experts: bool) -> Optional[str]:
    """Why precision.backend='te' cannot run with this parallel layout, or None; for the config
    checks, which run before anything is built."""
    if tp > 1:
        return (f"precision.backend='te' with parallel.tp={tp}: the tensor-parallel plan "
                f"(parallel/tensor_parallel.py) shards nn.Linear layers as DTensors, which te.Linear "
                f"neither is nor computes on; use parallel.tp=1 (FSDP2 shards the weights) or "
                f"precision=fp8_emulated")
    if ep > 1 and grouped_experts:
        return (f"precision.backend='te' with parallel.ep={ep} and precision.grouped_experts=true: "
                f"te.GroupedLinear is sized for all experts, expert parallelism hands each rank "
                f"its share; set precision.grouped_experts=false (experts in BF16) or parallel.ep=1")
    return None


def make_recipe(p: PrecisionConfig):
    """The TE recipe object of precision.recipe / fp8_format / the delayed-scaling settings
    (precision.margin applies to delayed scaling only: TE's current-scaling and block recipes
    have none)."""
    from transformer_engine.common import recipe as te_recipe

    cls_name, _ = TE_RECIPES[p.recipe]
    cls = getattr(te_recipe, cls_name, None)
    if cls is None:
        raise RuntimeError(f"precision.recipe={p.recipe!r}: this Transformer Engine version has no "
                           f"recipe.{cls_name}; upgrade TE or choose another recipe")
    fmt = te_recipe.Format.HYBRID if p.fp8_format == "hybrid" else te_recipe.Format.E4M3
    if p.recipe == "delayed":
        return cls(margin=p.margin, fp8_format=fmt, amax_history_len=p.amax_history_len,
                   amax_compute_algo=p.amax_compute_algo)
    return cls(fp8_format=fmt)


def check_recipe_supported(te, p: PrecisionConfig) -> None:
    """TE's own verdict on this GPU and build (e.g. MXFP8 needs Blackwell)."""
    _, check = TE_RECIPES[p.recipe]
    fn = getattr(te, check, None)
    if fn is not None:  # te.is_*_available(return_reason=True) -> (bool, reason)
        result = fn(return_reason=True)
    else:  # older TE: only FP8GlobalStateManager.is_*_available() -> (bool, reason)
        fn = getattr(_state_manager(), check, None)
        result = fn() if fn is not None else (False, f"TE has no {check}(); too old for this recipe")
    ok, reason = result if isinstance(result, tuple) else (bool(result), "")
    if not ok:
        raise RuntimeError(f"precision.recipe={p.recipe!r} is not supported here: {reason}")


def te_autocast_factory(te, recipe, group) -> Callable[[], ContextManager]:
    if hasattr(te, "autocast"):  # newer TE; fp8_autocast is deprecated there
        return lambda: te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def checkpoint_contexts() -> tuple[ContextManager, ContextManager]:
    """(forward context, recompute context) for one call of non-reentrant torch.utils.checkpoint
    (its `context_fn`, called at the start of the checkpointed forward, inside the TE autocast).

    They are the contexts TE's own non-reentrant checkpoint uses
    (transformer_engine.pytorch.distributed.get_activation_recompute_contexts): in the forward
    each TE module stashes its delayed-scaling scales and amax history; in the recompute it
    quantises with the stashed ones, so the recomputed FP8 values are the forward's, and then
    puts the current ones back, so no amax is recorded twice. The recompute runs in backward,
    outside the autocast: it also gets the forward's TE autocast state back (recipe, group), as
    the forward's quantisers expect, without entering an autocast, whose exit would update the
    delayed scales a second time.

    Call torch.utils.checkpoint with early_stop=False: TE puts a module's scales back after its
    forward returns, and a recompute stopped early inside a module never does (TE's own
    checkpoint never stops early)."""
    from transformer_engine.pytorch import distributed as te_dist

    get = getattr(te_dist, "get_activation_recompute_contexts", None)
    if get is not None:
        forward_ctx, recompute_ctx = get()
    else:  # older TE
        forward_ctx, recompute_ctx = (
            te_dist.activation_recompute_forward(activation_recompute=True, recompute_phase=phase)
            for phase in (False, True))
    manager = _state_manager()
    get_state = getattr(manager, "get_autocast_state", None) or manager.get_fp8_autocast_state
    set_state = getattr(manager, "set_autocast_state", None) or manager.set_fp8_autocast_state
    return forward_ctx, _in_state(get_state(), get_state, set_state, recompute_ctx)


@contextlib.contextmanager
def _in_state(state, get_state, set_state, inner: ContextManager):
    previous = get_state()
    set_state(state)
    try:
        with inner:
            yield
    finally:
        set_state(previous)


class _BytesExtraState:
    """Mixin: TE keeps a module's FP8 scaling state in `_extra_state` as a uint8 tensor (a pickle)
    that is empty until the module's first FP8 forward. DCP loads tensors in place and refuses a
    saved one of another size, so a resume, which builds the model afresh, fails
    (TransformerEngine issue 1860); as bytes the state is an object to DCP, stored and handed
    back whole."""

    def get_extra_state(self):
        state = super().get_extra_state()
        return state.detach().cpu().numpy().tobytes() if isinstance(state, torch.Tensor) else state

    def set_extra_state(self, state) -> None:
        if isinstance(state, (bytes, bytearray)):
            state = (torch.frombuffer(bytearray(state), dtype=torch.uint8) if state
                     else torch.empty(0, dtype=torch.uint8))
        super().set_extra_state(state)


@functools.lru_cache(maxsize=None)
def te_classes(te) -> tuple[type, Optional[type]]:
    """(PaddedTELinear, TEGroupedLinear or None when this TE has no GroupedLinear), built on the
    imported TE (its classes exist only once TE is imported)."""

    class PaddedTELinear(_BytesExtraState, te.Linear):
        """te.Linear that pads the token rows to a multiple of `align` (FP8 GEMMs need it; the
        vision tower's patch counts are arbitrary). x [..., K] -> [..., N]."""

        align = FP8_ROW_ALIGN

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            x2 = x.reshape(-1, x.shape[-1])
            rows = x2.shape[0]
            pad = (-rows) % self.align
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))
            y = super().forward(x2, *args, **kwargs)
            return y[:rows].view(*x.shape[:-1], y.shape[-1])

    if not hasattr(te, "GroupedLinear"):
        return PaddedTELinear, None

    class TEGroupedLinear(_BytesExtraState, te.GroupedLinear):
        """te.GroupedLinear without weights of its own: each call hands it per-expert weights.
        GroupedLinear.forward reads `getattr(self, f"weight{i}")`, so the views go into
        `_parameters` for the call (as plain tensors: autograd takes their gradients back to the
        stacked parameter) and out again after. x [M, K], m_splits [E] -> [M, N]."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for i in range(self.num_gemms):  # TE's own allocations, never used
                self._parameters[f"weight{i}"] = None

        def forward(self, x: torch.Tensor, m_splits: list[int], weights) -> torch.Tensor:
            for i, w in enumerate(weights):
                self._parameters[f"weight{i}"] = w
            try:
                return super().forward(x, m_splits)
            finally:
                for i in range(len(weights)):
                    self._parameters[f"weight{i}"] = None

    return PaddedTELinear, TEGroupedLinear


def to_te_linear(linear_cls: type, lin: nn.Linear, device: torch.device, align: int) -> nn.Module:
    new = linear_cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                     params_dtype=lin.weight.dtype, device=device)
    new.align = align
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


class TEGroupedExperts(GroupedExperts):
    """GroupedExperts whose two grouped GEMMs run through te.GroupedLinear on per-expert views
    of the stacked parameters (one unbind each, so the backward stacks the expert gradients in
    one op). x [M, D] sorted by expert, tokens_per_expert [E] -> [M, D]."""

    def setup_te(self, grouped_cls: type, device: torch.device, align: int) -> None:
        e, two_i, d = self.gate_up_proj.shape
        kw = dict(bias=False, params_dtype=self.gate_up_proj.dtype, device=device)
        self.te_gate_up = grouped_cls(e, d, two_i, **kw)
        self.te_down = grouped_cls(e, two_i // 2, d, **kw)
        self.te_align = align

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        local = tokens_per_expert.numel()
        if local != self.te_gate_up.num_gemms:  # the local experts of expert parallelism
            raise RuntimeError(te_layout_error(1, self.te_gate_up.num_gemms // local, True))
        xp, counts, dest = pad_groups(x, tokens_per_expert, self.te_align)
        m_splits = counts.tolist()  # TE takes the split sizes on the host
        gate, up = self.te_gate_up(xp, m_splits, self.gate_up_proj.unbind(0)).chunk(2, dim=-1)
        out = self.te_down(F.silu(gate) * up, m_splits, self.down_proj.unbind(0))
        return out[dest]


def _check_dims(name: str, m: nn.Module, p: PrecisionConfig, align: int) -> None:
    shapes = ([m.gate_up_proj.shape[1:], m.down_proj.shape[1:]] if isinstance(m, GroupedExperts)
              else [m.weight.shape])
    if any(d % align for s in shapes for d in s):
        raise ValueError(f"{name}: precision.recipe={p.recipe!r} needs weight dims in multiples of "
                         f"{align}, this layer has {' and '.join(str(tuple(s)) for s in shapes)}; "
                         f"add it to precision.extra_exclude")


def apply_te(model: nn.Module, names: list[str], p: PrecisionConfig, device: torch.device,
             amax_reduction_group=None) -> Callable[[], ContextManager]:
    """Swap the modules named in `names` for TE ones; return the factory of the FP8 autocast."""
    check_device(device)
    te = import_te()
    check_recipe_supported(te, p)
    recipe = make_recipe(p)
    linear_cls, grouped_cls = te_classes(te)
    align = TE_ALIGN.get(p.recipe, FP8_ROW_ALIGN)
    for name in names:
        _check_dims(name, model.get_submodule(name), p, align)
    for name in names:
        m = model.get_submodule(name)
        if type(m) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    to_te_linear(linear_cls, m, device, align))
        elif type(m) is GroupedExperts:
            if grouped_cls is None:
                raise RuntimeError("precision.grouped_experts=true but this Transformer Engine has "
                                   "no GroupedLinear; upgrade TE or set precision.grouped_experts=false")
            m.__class__ = TEGroupedExperts
            m.setup_te(grouped_cls, device, align)
        else:
            raise TypeError(f"{name}: the TE backend swaps nn.Linear and GroupedExperts, "
                            f"not {type(m).__name__}")
    return te_autocast_factory(te, recipe, amax_reduction_group)
