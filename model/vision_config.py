"""The vision tower's configuration: a flat dataclass nested in ModelConfig as `model.vision`.

Field names follow Hugging Face's `Qwen3_5VisionConfig` (depth, hidden_size, num_heads,
intermediate_size, ...). The output width of the patch merger is not a field: it is always the
language model's `hidden_size`, since merged visual tokens replace token embeddings.
The special-token ids live here too because only a model with vision reads them; the defaults are
the released Qwen3.5 ids (the smoke tokenizer's are 2..5, see configs/model/tiny_vl.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    hidden_act: str = "gelu_pytorch_tanh"   # the ViT MLP; the merger always uses exact GELU
    in_channels: int = 3
    patch_size: int = 16                    # spatial patch side, pixels
    temporal_patch_size: int = 2            # frames per patch; still images are repeated to fill it
    spatial_merge_size: int = 2             # the merger concatenates merge x merge patches
    # Learned position table of side sqrt(num_position_embeddings), resampled to every grid.
    num_position_embeddings: int = 2304
    rope_theta: float = 10_000.0
    layer_norm_eps: float = 1e-6

    # Released Qwen3.5 token ids (HF Qwen3_5Config).
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return int(round(self.num_position_embeddings ** 0.5))

    @property
    def merge_unit(self) -> int:
        """Patches per merged (language) token."""
        return self.spatial_merge_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    def validate(self, prefix: str = "model.vision", vocab_size: int | None = None) -> "VisionConfig":
        from model.config import ConfigError

        def need(ok: bool, fld: str, value, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{fld}={value!r}: {rule}")

        for fld in ("depth", "hidden_size", "num_heads", "intermediate_size", "in_channels",
                    "patch_size", "temporal_patch_size", "spatial_merge_size",
                    "num_position_embeddings"):
            need(getattr(self, fld) > 0, fld, getattr(self, fld), "must be > 0")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size,
             f"must be divisible by {prefix}.num_heads={self.num_heads}")
        # 2D rotary: a quarter of the head's channels per (row|column) x (cos-half|sin-half).
        need(self.head_dim % 4 == 0, "num_heads", self.num_heads,
             f"head_dim = hidden_size / num_heads = {self.head_dim} must be divisible by 4 "
             f"(2D rotary splits it into row and column halves of rotate-half pairs)")
        need(self.num_grid_per_side ** 2 == self.num_position_embeddings, "num_position_embeddings",
             self.num_position_embeddings, "must be a perfect square (a side x side table)")
        need(self.hidden_act in ACTIVATIONS, "hidden_act", self.hidden_act,
             f"must be one of {', '.join(ACTIVATIONS)}")
        need(self.layer_norm_eps > 0, "layer_norm_eps", self.layer_norm_eps, "must be > 0")
        ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        values = [getattr(self, f) for f in ids]
        need(len(set(values)) == 4, "image_token_id", values, f"{', '.join(ids)} must be distinct")
        if vocab_size is not None:
            for f in ids:
                need(0 <= getattr(self, f) < vocab_size, f, getattr(self, f),
                     f"must be in [0, model.vocab_size={vocab_size})")
        return self
