"""The language model's configuration: one flat dataclass, field names close to Hugging Face's.

It doubles as the Hydra structured-config schema (configs/model/*.yaml), so every field is a plain
type. `validate()` holds the cross-field rules; it runs before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from model.vision_config import VisionConfig

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
# model.attn_backend (model/attention_backend.py; named here so the schema needs no torch).
ATTN_BACKENDS = ("auto", "sdpa", "flex", "varlen")


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the field, the value and the rule."""


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    # Mixer per layer: an explicit list of "linear_attention"/"full_attention", or None for the
    # interval rule: layer i is full attention iff (i + 1) % full_attention_interval == 0.
    layer_types: Optional[List[str]] = None
    full_attention_interval: int = 4

    # Gated full attention.
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10_000_000.0
    # Interleaved M-RoPE frequency sections (t, h, w); they sum to rotary_dim / 2.
    mrope_section: Optional[List[int]] = None
    max_position_embeddings: int = 262_144

    # Gated DeltaNet.
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_conv_kernel_dim: int = 4

    # MLP: "moe" on every layer, or "dense" (SwiGLU of intermediate_size) on every layer;
    # mlp_only_layers lists layers that stay dense inside an MoE model.
    mlp_type: str = "moe"
    mlp_only_layers: List[int] = field(default_factory=list)
    intermediate_size: int = 256
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 64  # 0 disables the shared expert
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    # Auxiliary-loss-free balancing: a per-expert bias added to the scores for top-k selection only,
    # nudged after every step by `bias_update_rate * sign(mean load - load)`.
    router_bias_balancing: bool = False
    router_bias_update_rate: float = 0.001

    # Multi-token prediction: depth (0 = off) and the weight of its loss.
    mtp_num_layers: int = 0
    mtp_loss_coef: float = 0.3

    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    # Attention kernels (model/attention_backend.py): auto | sdpa | flex | varlen.
    attn_backend: str = "auto"

    # The vision tower (model/vision.py); None = a text-only model.
    vision: Optional[VisionConfig] = None

    # ---- derived -------------------------------------------------------------------------------

    def resolved_layer_types(self) -> List[str]:
        if self.layer_types is not None:
            return list(self.layer_types)
        k = self.full_attention_interval
        return [FULL_ATTENTION if (i + 1) % k == 0 else LINEAR_ATTENTION for i in range(self.num_layers)]

    def layer_is_moe(self, i: int) -> bool:
        return self.mlp_type == "moe" and i not in self.mlp_only_layers

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def resolved_mrope_section(self) -> List[int]:
        """Sections (t, h, w) over rotary_dim/2 frequencies; text-only models put all on t."""
        if self.mrope_section is not None:
            return list(self.mrope_section)
        return [self.rotary_dim // 2, 0, 0]

    # ---- validation ----------------------------------------------------------------------------

    def validate(self, prefix: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the first broken rule; return self when all hold."""

        def need(ok: bool, fld: str, value, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{fld}={value!r}: {rule}")

        for fld in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "linear_num_key_heads",
                    "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_conv_kernel_dim", "full_attention_interval"):
            need(getattr(self, fld) > 0, fld, getattr(self, fld), "must be > 0")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             self.num_attention_heads,
             f"must be divisible by model.num_key_value_heads={self.num_key_value_heads}")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_value_heads",
             self.linear_num_value_heads,
             f"must be divisible by model.linear_num_key_heads={self.linear_num_key_heads}")
        need(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor",
             self.partial_rotary_factor, "must be in (0, 1]")
        need(self.rotary_dim % 2 == 0 and self.rotary_dim > 0, "partial_rotary_factor",
             self.partial_rotary_factor,
             f"head_dim * partial_rotary_factor = {self.rotary_dim} must be a positive even number")
        if self.mrope_section is not None:
            need(len(self.mrope_section) == 3 and sum(self.mrope_section) == self.rotary_dim // 2,
                 "mrope_section", list(self.mrope_section),
                 f"must be 3 sections summing to rotary_dim/2 = {self.rotary_dim // 2}")
        if self.layer_types is not None:
            need(len(self.layer_types) == self.num_layers, "layer_types", list(self.layer_types),
                 f"must have one entry per layer (model.num_layers={self.num_layers}), "
                 f"got {len(self.layer_types)}")
            bad = [t for t in self.layer_types if t not in (FULL_ATTENTION, LINEAR_ATTENTION)]
            need(not bad, "layer_types", bad,
                 f"entries must be '{LINEAR_ATTENTION}' or '{FULL_ATTENTION}'")
        need(self.mlp_type in ("moe", "dense"), "mlp_type", self.mlp_type, "must be 'moe' or 'dense'")
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        need(not bad_layers, "mlp_only_layers", bad_layers,
             f"layer indices must be in [0, model.num_layers={self.num_layers})")
        if self.mlp_type == "dense" or self.mlp_only_layers:
            need(self.intermediate_size > 0, "intermediate_size", self.intermediate_size,
                 "must be > 0 when dense MLP layers are used")
        if self.mlp_type == "moe":
            need(self.num_experts > 0, "num_experts", self.num_experts, "must be > 0")
            need(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                 self.num_experts_per_tok,
                 f"must be in [1, model.num_experts={self.num_experts}]")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size",
                 self.moe_intermediate_size, "must be > 0")
            need(self.shared_expert_intermediate_size >= 0, "shared_expert_intermediate_size",
                 self.shared_expert_intermediate_size, "must be >= 0 (0 disables it)")
        for fld in ("router_aux_loss_coef", "router_z_loss_coef", "mtp_loss_coef",
                    "router_bias_update_rate"):
            need(getattr(self, fld) >= 0, fld, getattr(self, fld), "must be >= 0")
        need(self.mtp_num_layers >= 0, "mtp_num_layers", self.mtp_num_layers, "must be >= 0")
        need(self.attn_backend in ATTN_BACKENDS, "attn_backend", self.attn_backend,
             f"must be one of {list(ATTN_BACKENDS)}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if self.vision is not None:
            self.vision.validate(f"{prefix}.vision", vocab_size=self.vocab_size)
        return self


def load_model_config(name_or_path: str) -> ModelConfig:
    """A configs/model/NAME.yaml (or any YAML path) merged onto the schema and validated."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), _load_yaml_with_defaults(name_or_path))
    return OmegaConf.to_object(merged).validate()


def _load_yaml_with_defaults(name_or_path: str):
    """The YAML with its Hydra-style `defaults: [OTHER, _self_]` list resolved: OTHER names a
    sibling file of the same group (e.g. tiny_vl.yaml extends tiny.yaml), merged first."""
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if not path.suffix:
        path = Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"model config {name_or_path!r} not found (looked for {path})")
    node = OmegaConf.load(path)
    defaults = node.pop("defaults", None) or []
    parts = []
    for entry in defaults:
        if entry == "_self_":
            parts.append(node)
        elif isinstance(entry, str):
            parts.append(_load_yaml_with_defaults(str(path.with_name(f"{entry}.yaml"))))
        else:
            raise ConfigError(f"{path}: defaults entry {entry!r}: only sibling names and _self_ "
                              f"are supported in model configs")
    if "_self_" not in defaults:
        parts.append(node)
    return OmegaConf.merge(*parts)
