"""The Transformer Engine FP8 backend (CUDA only). Imported only when precision.backend == 'te':
`import transformer_engine` needs CUDA libraries, and a half-installed TE breaks at import.

- Each chosen nn.Linear becomes a te.Linear (weights copied; TE names its parameters `weight`
  and `bias` too, so the state-dict keys stay, plus TE's `<module>._extra_state`, which holds the
  FP8 scaling state (amax histories, scales) and is saved and restored with the checkpoint).
- Each chosen GroupedExperts becomes a TEGroupedExperts: the stacked `gate_up_proj` / `down_proj`
  parameters stay (names, checkpoint layout and optimizer state unchanged) and every forward
  hands TE's `GroupedLinear` per-expert views of them, on expert groups padded to 16 rows (32 for
  MXFP8) as FP8 grouped GEMMs require.
- The forward runs under TE's autocast (`te.autocast`, or `te.fp8_autocast` on older TE) with
  the recipe from config and the caller's amax reduction group.

Written against TE's documented API (Linear, GroupedLinear, autocast/fp8_autocast, the recipes of
transformer_engine.common.recipe, is_*_available); it is not run by the CPU test suite.
benchmarks/gpu_check.py exercises it on a GPU.
"""

from __future__ import annotations

import functools
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from model.moe import GroupedExperts
from train.fp8_config import PrecisionConfig
from train.fp8_emulated import FP8_ROW_ALIGN, pad_groups

# Our recipe name -> (TE recipe class, the availability check named like TE's is_*_available).
TE_RECIPES = {"delayed": ("DelayedScaling", "is_fp8_available"),
              "tensorwise": ("Float8CurrentScaling", "is_fp8_available"),
              "mxfp8": ("MXFP8BlockScaling", "is_mxfp8_available"),
              "blockwise": ("Float8BlockScaling", "is_fp8_block_scaling_available")}


def import_te():
    """transformer_engine.pytorch, or a RuntimeError that says what to do."""
    if not torch.cuda.is_available():
        raise RuntimeError("precision.backend='te' needs a CUDA GPU and none is visible; use "
                           "precision=fp8_emulated to run the FP8 policy on CPU")
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # ImportError, or a broken install failing to load its libraries
        raise RuntimeError(f"precision.backend='te': cannot import transformer_engine.pytorch "
                           f"({type(e).__name__}: {e}); install it with `pip install -e '.[te]'` "
                           f"on a CUDA machine, or use precision=fp8_emulated") from None
    return te


def make_recipe(p: PrecisionConfig):
    """The TE recipe object for precision.recipe / fp8_format / amax settings."""
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
    if fn is not None:
        ok, reason = fn(return_reason=True)
    else:  # older TE keeps the checks on FP8GlobalStateManager only
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

        fn = getattr(FP8GlobalStateManager, check, None)
        ok, reason = fn() if fn is not None else (False, f"TE has no {check}(); too old for this recipe")
    if not ok:
        raise RuntimeError(f"precision.recipe={p.recipe!r} is not supported here: {reason}")


def te_autocast_factory(te, recipe, group) -> Callable[[], ContextManager]:
    if hasattr(te, "autocast"):  # newer TE; fp8_autocast is deprecated there
        return lambda: te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


@functools.lru_cache(maxsize=1)
def _padded_linear_class(te):
    class PaddedTELinear(te.Linear):
        """te.Linear that pads the token rows to a multiple of 16 (FP8 GEMMs need it; the vision
        tower's patch counts are arbitrary). x [..., K] -> [..., N]."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            x2 = x.reshape(-1, x.shape[-1])
            rows = x2.shape[0]
            pad = (-rows) % FP8_ROW_ALIGN
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))
            y = super().forward(x2, *args, **kwargs)
            return y[:rows].view(*x.shape[:-1], y.shape[-1])

    return PaddedTELinear


def to_te_linear(te, lin: nn.Linear, device: torch.device) -> nn.Module:
    new = _padded_linear_class(te)(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                   params_dtype=lin.weight.dtype, device=device)
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


class TEGroupedExperts(GroupedExperts):
    """GroupedExperts whose two grouped GEMMs run through te.GroupedLinear. The stacked
    parameters stay the only weights: TE's own per-expert `weight{i}` slots are emptied and, for
    each call, filled with views of them (one unbind, so the backward stacks the expert
    gradients in one op). x [M, D] sorted by expert, tokens_per_expert [E] -> [M, D]."""

    def setup_te(self, te, recipe_name: str, device: torch.device) -> None:
        e, two_i, d = self.gate_up_proj.shape
        kw = dict(bias=False, params_dtype=self.gate_up_proj.dtype, device=device)
        self.te_gate_up = te.GroupedLinear(e, d, two_i, **kw)
        self.te_down = te.GroupedLinear(e, two_i // 2, d, **kw)
        for gl in (self.te_gate_up, self.te_down):
            for i in range(e):
                gl._parameters[f"weight{i}"] = None
        self.te_align = 32 if recipe_name == "mxfp8" else FP8_ROW_ALIGN

    @staticmethod
    def _grouped(gl: nn.Module, x: torch.Tensor, w: torch.Tensor, m_splits: list[int]) -> torch.Tensor:
        views = w.unbind(0)
        for i, v in enumerate(views):
            gl._parameters[f"weight{i}"] = v
        try:
            return gl(x, m_splits)
        finally:
            for i in range(len(views)):
                gl._parameters[f"weight{i}"] = None

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        xp, counts, dest = pad_groups(x, tokens_per_expert, self.te_align)
        m_splits = counts.tolist()  # TE takes the split sizes on the host
        gate, up = self._grouped(self.te_gate_up, xp, self.gate_up_proj, m_splits).chunk(2, dim=-1)
        out = self._grouped(self.te_down, F.silu(gate) * up, self.down_proj, m_splits)
        return out[dest]


def apply_te(model: nn.Module, names: list[str], p: PrecisionConfig, device: torch.device,
             amax_reduction_group=None) -> Callable[[], ContextManager]:
    """Swap the modules named in `names` for TE ones; return the factory of the FP8 autocast."""
    te = import_te()
    if device.type != "cuda":
        raise RuntimeError(f"precision.backend='te' needs train.device=cuda, the model is on {device}")
    check_recipe_supported(te, p)
    recipe = make_recipe(p)
    grouped = getattr(te, "GroupedLinear", None)
    for name in names:
        m = model.get_submodule(name)
        if type(m) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, to_te_linear(te, m, device))
        elif type(m) is GroupedExperts:
            if grouped is None:
                raise RuntimeError("precision.grouped_experts=true but this Transformer Engine has "
                                   "no GroupedLinear; upgrade TE or set precision.grouped_experts=false")
            m.__class__ = TEGroupedExperts
            m.setup_te(te, p.recipe, device)
        else:
            raise TypeError(f"{name}: the TE backend swaps nn.Linear and GroupedExperts, "
                            f"not {type(m).__name__}")
    return te_autocast_factory(te, recipe, amax_reduction_group)
