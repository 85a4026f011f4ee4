"""The precision policy's schema (configs/precision/*.yaml) and its cross-field checks.

No torch import here: the config is composed and checked before anything heavy is loaded.
`precision.backend`: none (every GEMM in the run's autocast dtype), emulated (FP8 quantise /
dequantise through torch's float8 types; any device), te (Transformer Engine FP8 GEMMs; CUDA).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import List

from model.config import ConfigError
from parallel.spec import fp8_sensitive_patterns

BACKENDS = ("none", "emulated", "te")
# delayed: per-tensor scale from an amax history of earlier steps (TE DelayedScaling);
# tensorwise: per-tensor scale from the current tensor (TE Float8CurrentScaling);
# mxfp8: 1x32 blocks with power-of-two (E8M0) scales (TE MXFP8BlockScaling, Blackwell);
# blockwise: 1x128 activation / gradient tiles and 128x128 weight blocks (DeepSeek-V3; TE
# Float8BlockScaling, Hopper).
RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FORMATS = ("hybrid", "e4m3")  # hybrid: e4m3 forward, e5m2 gradients; e4m3: e4m3 everywhere
AMAX_ALGOS = ("max", "most_recent")
# Lowest CUDA compute capability on which TE runs each recipe in FP8.
TE_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}

# Layers that stay in high precision by default: the `sensitive` rows of parallel/spec.py (fnmatch
# on the module's qualified name; `*` matches across dots). Why: the LM head sees the widest value
# ranges and is a small share of the FLOPs; the DeltaNet decay/beta gates' and the shared-expert
# gate's small errors change memory decay and mixing everywhere downstream; convolutions, norms,
# the vision patch embedding and merger and the MTP projection are small. (The embedding and the
# router are never FP8: the spec marks them `never`.)
DEFAULT_EXCLUDE = fp8_sensitive_patterns()


@dataclass
class PrecisionConfig:
    backend: str = "none"             # none | emulated | te
    recipe: str = "delayed"           # delayed | tensorwise | mxfp8 | blockwise
    fp8_format: str = "hybrid"        # hybrid (e4m3 forward, e5m2 gradients) | e4m3
    amax_history_len: int = 1024      # delayed scaling: steps of amax history
    amax_compute_algo: str = "max"    # delayed scaling: max over the history | most_recent
    margin: int = 0                   # per-tensor recipes: scale = fp8_max / amax / 2**margin
    # Which GEMM layers run FP8: those matching an `include` pattern and no `exclude` /
    # `extra_exclude` pattern, outside the first keep_first_n and last keep_last_n decoder layers.
    include: List[str] = field(default_factory=lambda: ["*"])
    exclude: List[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    extra_exclude: List[str] = field(default_factory=list)  # added to `exclude` (no need to repeat it)
    keep_first_n: int = 1
    keep_last_n: int = 1
    grouped_experts: bool = True      # routed experts' grouped GEMMs in FP8 too
    log_table: bool = True            # log the per-layer table at start-up (a summary line always)

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    def excluded_patterns(self) -> List[str]:
        return list(self.exclude) + list(self.extra_exclude)


def _choice(value, allowed, fld):
    if value not in allowed:
        raise ConfigError(f"{fld}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def validate_precision(p: PrecisionConfig, num_layers: int, device: str) -> None:
    """Raise ConfigError naming the field, the value and the rule. `device`: train.device."""
    _choice(p.backend, BACKENDS, "precision.backend")
    _choice(p.recipe, RECIPES, "precision.recipe")
    _choice(p.fp8_format, FORMATS, "precision.fp8_format")
    _choice(p.amax_compute_algo, AMAX_ALGOS, "precision.amax_compute_algo")
    if p.amax_history_len < 1:
        raise ConfigError(f"precision.amax_history_len={p.amax_history_len!r}: must be >= 1")
    if p.margin < 0:
        raise ConfigError(f"precision.margin={p.margin!r}: must be >= 0")
    for fld in ("keep_first_n", "keep_last_n"):
        if getattr(p, fld) < 0:
            raise ConfigError(f"precision.{fld}={getattr(p, fld)!r}: must be >= 0")
    if p.enabled and p.keep_first_n + p.keep_last_n > num_layers:
        raise ConfigError(
            f"precision.keep_first_n + precision.keep_last_n = {p.keep_first_n + p.keep_last_n}: "
            f"must be <= model.num_layers={num_layers}, or no decoder layer is left to run FP8")
    if p.backend == "te":
        check_te_request(p, device)


def check_te_request(p: PrecisionConfig, device: str) -> None:
    """The TE backend's preconditions, checked without importing transformer_engine (a
    half-installed TE breaks at import): a CUDA device, the package, and a GPU new enough for
    the recipe."""
    if device == "cpu":
        raise ConfigError("precision.backend='te': Transformer Engine runs on CUDA GPUs only, but "
                          "train.device='cpu'; use precision=fp8_emulated on CPU")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("precision.backend='te': no CUDA device is visible; Transformer Engine "
                          "FP8 needs one (use precision=fp8_emulated to test the policy on CPU)")
    if importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError("precision.backend='te': transformer_engine is not installed; install "
                          "it with `pip install -e '.[te]'` on a CUDA machine, or use "
                          "precision=fp8_emulated")
    need = TE_MIN_CAPABILITY[p.recipe]
    have = torch.cuda.get_device_capability()
    if have < need:
        raise ConfigError(f"precision.recipe={p.recipe!r}: needs a GPU of compute capability "
                          f"{need[0]}.{need[1]} or newer for precision.backend='te', this one "
                          f"({torch.cuda.get_device_name()}) is {have[0]}.{have[1]}")
