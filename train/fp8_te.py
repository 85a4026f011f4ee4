"""The Transformer Engine FP8 backend (CUDA only). Imported only when precision.backend == 'te';
transformer_engine itself is imported inside the functions: it needs CUDA libraries, and a
half-installed TE breaks at import.

The chosen modules keep their own parameters (names, checkpoint layout, optimizer state, and the
sharding that FSDP2, the tensor-parallel plan and expert parallelism apply to them); a private TE
module computes their GEMMs on tensors lent to it for each call (TE reads its weights with
getattr on every forward):

- each chosen nn.Linear becomes a TELinear, still an nn.Linear (so the tensor-parallel styles
  shard it like any Linear), whose GEMM runs through `.te`, a te.Linear without weights of its
  own; under a column- or row-parallel plan it computes on the local shard and returns a
  DTensor, as train/fp8_emulated.py's EmulatedFp8Linear does. Token rows are padded to 16 (32
  for MXFP8);
- each chosen GroupedExperts becomes a TEGroupedExperts, whose two te.GroupedLinear children
  (one GEMM per expert of this rank: E / parallel.ep) get per-expert views of the stacked
  `gate_up_proj` / `down_proj`, on expert groups padded to 16 rows (32 for MXFP8);
- TE's FP8 scaling state (delayed scaling's amax histories and scales) is checkpointed, as
  bytes, in `<module>._extra_state` (experts: `<module>.te_gate_up._extra_state`, `.te_down`);
- the forward runs under TE's autocast (`te.autocast`, or `te.fp8_autocast` on TE versions
  before the rename) with the recipe from config and the caller's amax reduction group;
  `checkpoint_contexts` makes activation checkpointing's recompute reuse the forward's scales.

Checked against TE's source (module/linear.py, module/grouped_linear.py, module/base.py,
quantization.py / fp8.py, distributed.py, common/recipe); tests/test_fp8_te.py checks the wiring
on CPU against a fake TE with the same signatures, also under tensor, expert and FSDP2
parallelism; benchmarks/gpu_check.py runs it on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

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


def te_layout_error(ep: int, grouped_experts: bool, recipe: str) -> Optional[str]:
    """Why precision.backend='te' cannot run with this parallel layout, or None; for the config
    checks, which run before anything is built."""
    if ep > 1 and grouped_experts and recipe == "delayed":
        # TE keeps a GroupedLinear's amax histories per GEMM slot, i.e. per local expert, and
        # max-reduces them over the whole amax group, where each ep rank holds other experts in
        # the same slots; a checkpoint keeps one rank's copy of that opaque state.
        return (f"precision.backend='te' with precision.recipe='delayed', parallel.ep={ep} and "
                f"precision.grouped_experts=true: TE's delayed scaling keeps per-expert amax "
                f"histories per GEMM slot, which under expert parallelism hold other experts on "
                f"each rank (their amaxes would be mixed, and a checkpoint keeps one rank's); use "
                f"precision.recipe=tensorwise, mxfp8 or blockwise (no state across ranks), "
                f"precision.grouped_experts=false (experts in BF16) or parallel.ep=1")
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


class _LentWeights:
    """Mixin for a TE module that owns no weights: TE allocates its parameters at construction,
    they are dropped, and `lend` puts the caller's tensors in their slots for one call (TE reads
    them with getattr in every forward: Linear._get_weight_tensors / GroupedLinear's
    `weight{i}`). Autograd takes their gradients back to the caller's parameters.

    TE keeps the FP8 scaling state in `_extra_state`, a uint8 tensor (a pickle) that is empty
    until the module's first FP8 forward. DCP loads tensors in place and refuses a saved one of
    another size, so a resume, which builds the model afresh, fails (TransformerEngine issue
    1860); as bytes the state is an object to DCP, stored and handed back whole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self._parameters:
            self._parameters[name] = None

    def lend(self, tensors: dict[str, torch.Tensor], *args) -> torch.Tensor:
        self._parameters.update(tensors)
        try:
            return self(*args)
        finally:
            for name in tensors:
                self._parameters[name] = None

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
    """(te.Linear, te.GroupedLinear or None when this TE has none), both without weights of their
    own (`_LentWeights`), built on the imported TE (its classes exist only once it is imported)."""
    linear = type("TELinearCore", (_LentWeights, te.Linear), {})
    grouped = getattr(te, "GroupedLinear", None)
    if grouped is not None:
        grouped = type("TEGroupedLinear", (_LentWeights, grouped), {})
    return linear, grouped


class TELinear(nn.Linear):
    """nn.Linear whose GEMM runs through `self.te` (a te.Linear that owns no weights) on this
    module's weight and bias, token rows padded to a multiple of `te_align`. x [..., K] -> [..., N].

    Under the tensor-parallel plan the weight is a DTensor (parallel/tensor_parallel.py's
    ColwiseParallel / RowwiseParallel); inside a LocalCompute region (the mixers) the forward
    already sees the local shard as a plain tensor."""

    def setup_te(self, core_cls: type, device: torch.device, align: int) -> None:
        # Not a registered submodule: the tensor-parallel styles shard the `weight` of every
        # submodule, and this one has none. TE's FP8 state is this module's extra state.
        self.__dict__["te"] = core_cls(self.in_features, self.out_features,
                                       bias=self.bias is not None, params_dtype=self.weight.dtype,
                                       device=device)
        self.te_align = align

    def get_extra_state(self):
        return self.te.get_extra_state()

    def set_extra_state(self, state) -> None:
        self.te.set_extra_state(state)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, GEMM through transformer_engine"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, DTensor):
            return self._tensor_parallel_forward(x)
        return self._gemm(x, self.weight, self.bias)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        if rows == 0:  # the vision tower on zero patches: no GEMM for TE to run
            return F.linear(x, weight, bias)
        pad = (-rows) % self.te_align
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        lent = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        y = self.te.lend(lent, x2)  # TE reads the GEMM's shape from the weight it is lent
        return y[:rows].view(*x.shape[:-1], y.shape[-1])

    def _tensor_parallel_forward(self, x: DTensor) -> DTensor:
        """Column-parallel (weight Shard(0)): replicated input, output sharded on its last dim;
        row-parallel (Shard(1)): input sharded on its last dim, output a partial sum, which the
        style reduces. TE multiplies the local shards; delayed scaling's amaxes are max-reduced
        over the autocast's group (the tp ranks among them), so a weight's scale is the whole
        weight's, as without tensor parallelism."""
        if self.bias is not None:
            raise NotImplementedError("TE under tensor parallelism: linear layers with a bias are "
                                      "not sharded by the plans")
        column = self.weight.placements[0] == Shard(0)
        # Column-parallel: the input is replicated and its gradient a partial sum over the ranks.
        x_local = x.to_local(grad_placements=[Partial()] if column else None)
        y = self._gemm(x_local, self.weight.to_local(), None)
        return DTensor.from_local(y, self.weight.device_mesh,
                                  [Shard(y.dim() - 1)] if column else [Partial()], run_check=False)


class TEGroupedExperts(GroupedExperts):
    """GroupedExperts whose two grouped GEMMs run through te.GroupedLinear on per-expert views
    of the stacked parameters (one unbind each, so the backward stacks the expert gradients in
    one op). Under expert parallelism (parallel/expert_parallel.py) the forward sees this rank's
    shard of them, and the GroupedLinears are built for E / ep experts.
    x [M, D] sorted by expert, tokens_per_expert [E / ep] -> [M, D]."""

    def setup_te(self, grouped_cls: type, device: torch.device, align: int, ep_size: int) -> None:
        e, two_i, d = self.gate_up_proj.shape
        kw = dict(bias=False, params_dtype=self.gate_up_proj.dtype, device=device)
        self.te_gate_up = grouped_cls(e // ep_size, d, two_i, **kw)
        self.te_down = grouped_cls(e // ep_size, two_i // 2, d, **kw)
        self.te_align = align

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up_proj, self.down_proj  # this rank's experts
        if gate_up.shape[0] != self.te_gate_up.num_gemms:
            raise RuntimeError(f"TEGroupedExperts: TE's GroupedLinear was built for "
                               f"{self.te_gate_up.num_gemms} experts per rank, this rank computes "
                               f"{gate_up.shape[0]}; pass parallel.ep to apply_precision (ep_size)")
        if x.shape[0] == 0:  # an expert-parallel rank that received no tokens
            return super().forward(x, tokens_per_expert)
        xp, counts, dest = pad_groups(x, tokens_per_expert, self.te_align)
        m_splits = counts.tolist()  # TE takes the split sizes on the host

        def weights(w: torch.Tensor) -> dict[str, torch.Tensor]:
            return {f"weight{i}": we for i, we in enumerate(w.unbind(0))}

        gate, up = self.te_gate_up.lend(weights(gate_up), xp, m_splits).chunk(2, dim=-1)
        out = self.te_down.lend(weights(down), F.silu(gate) * up, m_splits)
        return out[dest]


def _check_dims(name: str, m: nn.Module, p: PrecisionConfig, align: int) -> None:
    shapes = ([m.gate_up_proj.shape[1:], m.down_proj.shape[1:]] if isinstance(m, GroupedExperts)
              else [m.weight.shape])
    if any(d % align for s in shapes for d in s):
        raise ValueError(f"{name}: precision.recipe={p.recipe!r} needs weight dims in multiples of "
                         f"{align}, this layer has {' and '.join(str(tuple(s)) for s in shapes)}; "
                         f"add it to precision.extra_exclude")


def apply_te(model: nn.Module, names: list[str], p: PrecisionConfig, device: torch.device,
             amax_reduction_group=None, ep_size: int = 1) -> Callable[[], ContextManager]:
    """Swap the modules named in `names` for TE ones, in place, before any parallelism is applied
    (`ep_size`: the expert-parallel size that will shard the experts); return the factory of the
    FP8 autocast."""
    check_device(device)
    te = import_te()
    check_recipe_supported(te, p)
    chosen = [model.get_submodule(name) for name in names]
    error = te_layout_error(ep_size, any(type(m) is GroupedExperts for m in chosen), p.recipe)
    if error:
        raise ValueError(error)
    recipe = make_recipe(p)
    linear_cls, grouped_cls = te_classes(te)
    align = TE_ALIGN.get(p.recipe, FP8_ROW_ALIGN)
    for name, m in zip(names, chosen):
        _check_dims(name, m, p, align)
    for name, m in zip(names, chosen):
        if type(m) is nn.Linear:
            m.__class__ = TELinear
            m.setup_te(linear_cls, device, align)
        elif type(m) is GroupedExperts:
            if grouped_cls is None:
                raise RuntimeError("precision.grouped_experts=true but this Transformer Engine has "
                                   "no GroupedLinear; upgrade TE or set precision.grouped_experts=false")
            m.__class__ = TEGroupedExperts
            m.setup_te(grouped_cls, device, align, ep_size)
        else:
            raise TypeError(f"{name}: the TE backend swaps nn.Linear and GroupedExperts, "
                            f"not {type(m).__name__}")
    return te_autocast_factory(te, recipe, amax_reduction_group)
