"""Hugging Face config.json <-> ModelConfig, for the five released layouts (the "families").

| family             | HF class                              | text keys under      | GDN projections          |
| ------------------ | ------------------------------------- | -------------------- | ------------------------ |
| `qwen3_5`          | Qwen3_5ForConditionalGeneration       | model.language_model | separate qkv / z / b / a |
| `qwen3_5_moe`      | Qwen3_5MoeForConditionalGeneration    | model.language_model | separate                 |
| `qwen3_5_text`     | Qwen3_5ForCausalLM                    | model                | separate                 |
| `qwen3_5_moe_text` | Qwen3_5MoeForCausalLM                 | model                | separate                 |
| `qwen3_next`       | Qwen3NextForCausalLM                  | model                | fused qkvz / ba per head |

The mapping is faithful or it fails: a field the project cannot represent (YaRN rope, attention
bias, an activation other than SiLU, a vision tower whose output width differs from the decoder's)
raises ConfigError naming the HF field; `model_to_hf_config` refuses the reverse cases the same way.
Only json is read here: transformers is not needed at run time.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from model.config import FULL_ATTENTION, LINEAR_ATTENTION, ConfigError, ModelConfig
from model.vision_config import VisionConfig


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    text_prefix: str          # where the decoder's weights live in the HF state dict
    vision: bool              # has `vision_config` and `model.visual.*`
    moe: bool                 # MoE decoder (qwen3_next may also be dense: see its config)
    fused_gdn: bool           # Qwen3-Next in_proj_qkvz / in_proj_ba
    text_model_type: str


FAMILIES = {f.name: f for f in (
    Family("qwen3_5", "Qwen3_5ForConditionalGeneration", "model.language_model.", True, False, False,
           "qwen3_5_text"),
    Family("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "model.language_model.", True, True,
           False, "qwen3_5_moe_text"),
    Family("qwen3_5_text", "Qwen3_5ForCausalLM", "model.", False, False, False, "qwen3_5_text"),
    Family("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "model.", False, True, False,
           "qwen3_5_moe_text"),
    Family("qwen3_next", "Qwen3NextForCausalLM", "model.", False, True, True, "qwen3_next"),
)}

# The released Qwen3.5 default when a config has no mrope_section (transformers does the same).
DEFAULT_MROPE_SECTION = [11, 11, 10]
# transformers builds the ViT LayerNorms with a fixed eps.
HF_VISION_LAYER_NORM_EPS = 1e-6


def family_of(hf_config: dict) -> Family:
    mt = hf_config.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"config.json model_type={mt!r}: supported are {', '.join(FAMILIES)}")
    return FAMILIES[mt]


def text_config_of(hf_config: dict) -> dict:
    return hf_config["text_config"] if family_of(hf_config).vision else hf_config


# ---- HF -> project --------------------------------------------------------------------------------

def _rope(t: dict) -> tuple[float, float, Optional[list[int]]]:
    """(rope_theta, partial_rotary_factor, mrope_section or None) from either the v5 `rope_parameters`
    dict or the older top-level rope_theta / partial_rotary_factor / rope_scaling fields."""
    rp = t.get("rope_parameters") or {}
    scaling = t.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", rp.get("type", scaling.get("rope_type", scaling.get("type", "default"))))
    if rope_type not in ("default", None):
        raise ConfigError(f"config.json rope_type={rope_type!r}: only 'default' rope is supported "
                          f"(YaRN and other scalings are not implemented in model/rope.py)")
    theta = float(rp.get("rope_theta", t.get("rope_theta", 10_000.0)))
    partial = float(rp.get("partial_rotary_factor", t.get("partial_rotary_factor", 0.25)))
    mrope = rp.get("mrope_section", scaling.get("mrope_section"))
    return theta, partial, (list(mrope) if mrope is not None else None)


def effective_mrope_section(section: list[int], num_freqs: int) -> list[int]:
    """The (t, h, w) sections, over `num_freqs` rotary frequencies, that select the same rows.

    transformers assigns frequency f to h iff f % 3 == 1 and f < 3*s_h (w: f % 3 == 2, f < 3*s_w),
    whatever the sum of the sections; model/rope.py uses the same rule but validates that the
    sections sum to num_freqs. Clipping s_h and s_w to the frequencies that exist keeps the rule's
    result and makes the sum valid (e.g. the default [11, 11, 10] on a 4-frequency debug model).
    """
    n_h = len(range(1, num_freqs, 3))
    n_w = len(range(2, num_freqs, 3))
    s_h, s_w = min(section[1], n_h), min(section[2], n_w)
    return [num_freqs - s_h - s_w, s_h, s_w]


def _layer_pattern(layer_types: Optional[list[str]], n: int, interval: int) -> dict:
    """{'full_attention_interval': k} when the list follows the interval rule, else {'layer_types'}."""
    if layer_types is None:
        return {"full_attention_interval": interval}
    bad = [x for x in layer_types if x not in (FULL_ATTENTION, LINEAR_ATTENTION)]
    if bad:
        raise ConfigError(f"config.json layer_types has {bad!r}: only '{LINEAR_ATTENTION}' and "
                          f"'{FULL_ATTENTION}' are supported")
    for k in range(1, n + 1):
        if all((x == FULL_ATTENTION) == ((i + 1) % k == 0) for i, x in enumerate(layer_types)):
            return {"full_attention_interval": k}
    return {"layer_types": list(layer_types)}


def _need(ok: bool, field: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"config.json {field}={value!r}: {rule}")


def hf_to_model_config(hf_config: dict, name: str = "hf", mtp_num_layers: Optional[int] = None
                       ) -> ModelConfig:
    """A parsed config.json -> validated ModelConfig. `mtp_num_layers` overrides the config's MTP
    depth (the importer passes what the weights hold)."""
    fam = family_of(hf_config)
    t = text_config_of(hf_config)
    where = "text_config." if fam.vision else ""
    _need(t.get("hidden_act", "silu") == "silu", where + "hidden_act", t.get("hidden_act"),
          "only silu (SwiGLU) MLPs are supported")
    _need(not t.get("attention_bias", False), where + "attention_bias", t.get("attention_bias"),
          "the gated attention has no biases")
    theta, partial, mrope = _rope(t)
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    n = t["num_hidden_layers"]
    kw: dict[str, Any] = dict(
        name=name, vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=n,
        num_attention_heads=heads, num_key_value_heads=t.get("num_key_value_heads", heads),
        head_dim=head_dim, partial_rotary_factor=partial, rope_theta=theta,
        max_position_embeddings=t.get("max_position_embeddings", 32768),
        linear_num_key_heads=t["linear_num_key_heads"], linear_num_value_heads=t["linear_num_value_heads"],
        linear_key_head_dim=t["linear_key_head_dim"], linear_value_head_dim=t["linear_value_head_dim"],
        linear_conv_kernel_dim=t.get("linear_conv_kernel_dim", 4),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6), initializer_range=t.get("initializer_range", 0.02),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
    )
    kw.update(_layer_pattern(t.get("layer_types"), n, t.get("full_attention_interval", 4)))
    if fam.name != "qwen3_next":
        # Qwen3.5 always uses interleaved M-RoPE (transformers ignores mrope_interleaved).
        rotary_freqs = int(head_dim * partial) // 2
        kw["mrope_section"] = effective_mrope_section(mrope or DEFAULT_MROPE_SECTION, rotary_freqs)

    defaults = ModelConfig()
    kw["intermediate_size"] = t.get("intermediate_size", defaults.intermediate_size)
    if fam.name == "qwen3_next" and t.get("num_experts", 512) > 0:
        step = t.get("decoder_sparse_step", 1)
        only = set(t.get("mlp_only_layers") or []) | {i for i in range(n) if (i + 1) % step != 0}
        kw.update(mlp_type="moe", mlp_only_layers=sorted(only), norm_topk_prob=t.get("norm_topk_prob", True))
    elif fam.moe and fam.name != "qwen3_next":
        kw.update(mlp_type="moe", norm_topk_prob=True)  # Qwen3.5-MoE's router always renormalises
    else:
        kw.update(mlp_type="dense")
    if kw["mlp_type"] == "moe":
        kw.update(num_experts=t.get("num_experts", 512), num_experts_per_tok=t.get("num_experts_per_tok", 10),
                  moe_intermediate_size=t.get("moe_intermediate_size", 512),
                  shared_expert_intermediate_size=t.get("shared_expert_intermediate_size", 512),
                  router_aux_loss_coef=t.get("router_aux_loss_coef", 0.001))
    if mtp_num_layers is None:
        mtp_num_layers = t.get("mtp_num_hidden_layers", t.get("num_nextn_predict_layers", 0)) or 0
    kw["mtp_num_layers"] = mtp_num_layers

    if fam.vision:
        kw["vision"] = hf_to_vision_config(hf_config, t["hidden_size"])
    return ModelConfig(**kw).validate()


def hf_to_vision_config(hf_config: dict, text_hidden: int) -> VisionConfig:
    v = hf_config["vision_config"]
    out = v.get("out_hidden_size", text_hidden)
    _need(out == text_hidden, "vision_config.out_hidden_size", out,
          f"must equal text_config.hidden_size={text_hidden} (merged tokens replace embeddings)")
    _need(not v.get("deepstack_visual_indexes"), "vision_config.deepstack_visual_indexes",
          v.get("deepstack_visual_indexes"), "DeepStack (Qwen3-VL) is not part of Qwen3.5")
    for f in ("patch_size", "temporal_patch_size"):
        _need(isinstance(v.get(f, 1), int), f"vision_config.{f}", v.get(f), "must be one integer")
    rp = v.get("rope_parameters") or {}
    defaults = VisionConfig()
    return VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"], hidden_act=v.get("hidden_act", defaults.hidden_act),
        in_channels=v.get("in_channels", 3), patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        rope_theta=float(rp.get("rope_theta", v.get("rope_theta", 10_000.0))),
        layer_norm_eps=HF_VISION_LAYER_NORM_EPS,
        image_token_id=hf_config.get("image_token_id", defaults.image_token_id),
        video_token_id=hf_config.get("video_token_id", defaults.video_token_id),
        vision_start_token_id=hf_config.get("vision_start_token_id", defaults.vision_start_token_id),
        vision_end_token_id=hf_config.get("vision_end_token_id", defaults.vision_end_token_id),
    )


# ---- project -> HF --------------------------------------------------------------------------------

def default_family(cfg: ModelConfig) -> str:
    """The Qwen3.5 class that holds this model: with vision the multimodal one, else the text one."""
    moe = cfg.mlp_type == "moe"
    if cfg.vision is not None:
        return "qwen3_5_moe" if moe else "qwen3_5"
    return "qwen3_5_moe_text" if moe else "qwen3_5_text"


def check_exportable(cfg: ModelConfig, fam: Family) -> None:
    """Raise ConfigError when `fam`'s transformers class cannot compute what `cfg` describes."""

    def need(ok: bool, field: str, value, rule: str) -> None:
        if not ok:
            raise ConfigError(f"model.{field}={value!r}: cannot export as {fam.name}: {rule}")

    need((cfg.vision is not None) == fam.vision, "vision", "set" if cfg.vision else None,
         "a vision tower needs qwen3_5 / qwen3_5_moe, a text-only model a text family")
    if fam.name == "qwen3_next":
        need(cfg.mlp_type == "dense" or cfg.shared_expert_intermediate_size > 0,
             "shared_expert_intermediate_size", cfg.shared_expert_intermediate_size,
             "Qwen3-Next MoE layers always have a shared expert")
    elif fam.moe:
        need(cfg.mlp_type == "moe" and not cfg.mlp_only_layers, "mlp_type", cfg.mlp_type,
             "Qwen3.5-MoE has an MoE block on every layer (mlp_only_layers must be empty)")
        need(cfg.norm_topk_prob, "norm_topk_prob", cfg.norm_topk_prob,
             "Qwen3.5-MoE always renormalises the top-k weights")
        need(cfg.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size",
             cfg.shared_expert_intermediate_size, "Qwen3.5-MoE always has a shared expert")
    else:
        need(cfg.mlp_type == "dense", "mlp_type", cfg.mlp_type, f"{fam.name} is the dense family")
    if cfg.vision is not None:
        need(cfg.vision.layer_norm_eps == HF_VISION_LAYER_NORM_EPS, "vision.layer_norm_eps",
             cfg.vision.layer_norm_eps, "transformers' ViT LayerNorms use eps 1e-6")


def model_to_hf_config(cfg: ModelConfig, family: str, base: Optional[dict] = None,
                       dtype: str = "bfloat16") -> dict:
    """ModelConfig -> config.json dict for `family`. `base` (e.g. the config.json the checkpoint
    was imported from) keeps fields the project does not model (token ids, generation settings)."""
    fam = FAMILIES[family]
    check_exportable(cfg, fam)
    out = copy.deepcopy(base) if base and base.get("model_type") == family else {}
    text = (out.get("text_config") if fam.vision else out) or {}
    for stale in ("rope_scaling", "rope_theta", "partial_rotary_factor", "full_attention_interval",
                  "decoder_sparse_step", "mlp_only_layers", "mtp_num_hidden_layers",
                  "num_nextn_predict_layers"):
        text.pop(stale, None)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor}
    if fam.name != "qwen3_next":
        rope.update(mrope_section=cfg.resolved_mrope_section(), mrope_interleaved=True)
    text.update(
        model_type=fam.text_model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, attention_dropout=0.0, rope_parameters=rope,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim, linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads, layer_types=cfg.resolved_layer_types(),
    )
    if fam.name == "qwen3_next":
        text.update(intermediate_size=cfg.intermediate_size, decoder_sparse_step=1,
                    mlp_only_layers=sorted(cfg.mlp_only_layers) if cfg.mlp_type == "moe" else [],
                    norm_topk_prob=cfg.norm_topk_prob)
    elif not fam.moe:
        text.update(intermediate_size=cfg.intermediate_size)
    if cfg.mlp_type == "moe":
        text.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                    moe_intermediate_size=cfg.moe_intermediate_size,
                    shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                    router_aux_loss_coef=cfg.router_aux_loss_coef)
    elif fam.name == "qwen3_next":
        text.update(num_experts=0)
    if cfg.mtp_num_layers:
        text["num_nextn_predict_layers" if fam.name == "qwen3_next" else "mtp_num_hidden_layers"] = \
            cfg.mtp_num_layers
    if not fam.vision:
        text.update(architectures=[fam.architecture], dtype=dtype)
        return text
    v = cfg.vision
    vision = dict(out.get("vision_config") or {})
    vision.update(
        model_type=f"{family}_vision", depth=v.depth, hidden_size=v.hidden_size, hidden_act=v.hidden_act,
        intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
        patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size, out_hidden_size=cfg.hidden_size,
        num_position_embeddings=v.num_position_embeddings, initializer_range=cfg.initializer_range,
        rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
    )
    out.update(architectures=[fam.architecture], model_type=family, text_config=text,
               vision_config=vision, image_token_id=v.image_token_id, video_token_id=v.video_token_id,
               vision_start_token_id=v.vision_start_token_id, vision_end_token_id=v.vision_end_token_id,
               tie_word_embeddings=cfg.tie_word_embeddings, dtype=dtype)
    return out


# ---- a given model config against config.json ---------------------------------------------------

# Knobs of training, not of the weights or the function they compute: a run may set its own.
TRAINING_FIELDS = {"name", "initializer_range", "max_position_embeddings", "router_aux_loss_coef",
                   "router_z_loss_coef", "router_bias_balancing", "router_bias_update_rate",
                   "mtp_loss_coef"}


def model_config_mismatches(cfg: ModelConfig, hf_config: dict) -> list[str]:
    """'model.FIELD=ours, config.json says theirs' for every field of `cfg` that disagrees with the
    model config.json describes ([] when they agree). The layer pattern and M-RoPE sections are
    compared as resolved; an MTP depth of 0 is allowed against a checkpoint with MTP weights (they
    are left out)."""
    hf = hf_to_model_config(hf_config, cfg.name)
    out = []

    def differ(field: str, ours: Any, theirs: Any) -> None:
        if ours != theirs:
            out.append(f"model.{field}={ours!r}, config.json says {theirs!r}")

    skip = TRAINING_FIELDS | {"layer_types", "full_attention_interval", "mrope_section", "vision",
                              "mtp_num_layers", "mlp_only_layers"}
    if hf.mlp_type == "moe" and not hf.mlp_only_layers:  # no dense MLP: its width is unused
        skip |= {"intermediate_size"}
    if hf.mlp_type == "dense":
        skip |= {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "shared_expert_intermediate_size", "norm_topk_prob"}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in skip:
            differ(f.name, getattr(cfg, f.name), getattr(hf, f.name))
    differ("layer_types (resolved)", cfg.resolved_layer_types(), hf.resolved_layer_types())
    if hf.mlp_type == "moe":
        differ("mlp_only_layers", sorted(cfg.mlp_only_layers), sorted(hf.mlp_only_layers))
    if fam_has_mrope(hf_config):
        differ("mrope_section (resolved)", cfg.resolved_mrope_section(), hf.resolved_mrope_section())
    if cfg.mtp_num_layers not in (0, hf.mtp_num_layers):
        differ("mtp_num_layers", cfg.mtp_num_layers, hf.mtp_num_layers)
    if (cfg.vision is None) != (hf.vision is None):
        differ("vision", "set" if cfg.vision else None, "set" if hf.vision else None)
    elif cfg.vision is not None:
        for f in dataclasses.fields(cfg.vision):
            differ(f"vision.{f.name}", getattr(cfg.vision, f.name), getattr(hf.vision, f.name))
    return out


def fam_has_mrope(hf_config: dict) -> bool:
    return family_of(hf_config).name != "qwen3_next"
