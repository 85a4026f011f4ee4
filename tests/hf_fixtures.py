"""Tiny random Hugging Face checkpoints of each family, built with transformers (nothing downloaded),
and multimodal inputs in the processors' layout. Shared by tests/test_hf_*.py."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 1024
# Vision token ids inside the tiny vocabulary (the released ones are >= 248053).
VISION_IDS = dict(vision_start_token_id=1000, vision_end_token_id=1001, image_token_id=1002,
                  video_token_id=1003)
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, intermediate_size=96,
            rms_norm_eps=1e-6)
# 8 rotary channels (4 frequencies) so that t, h and w each drive some.
QWEN35_ROPE = dict(rope_type="default", rope_theta=1_000_000.0, partial_rotary_factor=0.5,
                   mrope_section=[2, 1, 1], mrope_interleaved=True)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
              num_position_embeddings=64, patch_size=16, temporal_patch_size=2, spatial_merge_size=2)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so that a wrong norm convention ((1+w) vs w), a mis-split fused weight
    or a dropped tensor changes the logits (transformers initialises norms to 0 or 1 exactly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim <= 1:
                p.add_(0.2 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model of `family` with random weights, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "qwen3_next":
        cfg = tf.Qwen3NextConfig(**{**TEXT, **MOE, "norm_topk_prob": False, "mlp_only_layers": [0],
                                    "layer_types": ["linear_attention", "full_attention"] * 2,
                                    "rope_parameters": dict(rope_type="default", rope_theta=10_000.0,
                                                            partial_rotary_factor=0.25),
                                    **overrides})
        model = tf.Qwen3NextForCausalLM(cfg)
    else:
        text = dict(TEXT, rope_parameters=QWEN35_ROPE)
        if family == "qwen3_5_moe":
            text.update(MOE)
        text.update(overrides.pop("text", {}))
        cls_cfg, cls = {"qwen3_5": (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration),
                        "qwen3_5_moe": (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration)}[family]
        cfg = cls_cfg(text_config=text, vision_config=dict(VISION), **VISION_IDS, **overrides)
        model = cls(cfg)
    return randomize_(model.float(), seed).eval()


def save_hf_model(family: str, path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    model = build_hf_model(family, seed, **overrides)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return model


# ---- inputs ---------------------------------------------------------------------------------------

IMAGE_GRIDS = [(1, 4, 6), (1, 2, 2)]   # 6 and 1 merged tokens
VIDEO_GRIDS = [(2, 4, 4)]              # 2 temporal patches of 4 merged tokens
PATCH_DIM = 3 * 2 * 16 * 16


def multimodal_batch(seq_len: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows as a processor returns them: row 0 text + image 0 + text + a video (two temporal
    patches, each after its timestamp text) + text; row 1 text + image 1 + text. Pixel values are
    random patches in the flattened [N, C*Tp*P*P] layout."""
    g = torch.Generator().manual_seed(seed)
    vs, ve = VISION_IDS["vision_start_token_id"], VISION_IDS["vision_end_token_id"]
    img, vid = VISION_IDS["image_token_id"], VISION_IDS["video_token_id"]

    def text(n):
        return torch.randint(0, 990, (n,), generator=g).tolist()

    def block(pad, n):
        return [vs] + [pad] * n + [ve]

    row0 = text(3) + block(img, 6) + text(4)
    for _ in range(VIDEO_GRIDS[0][0]):
        row0 += text(3) + block(vid, 4)   # "<0.5 seconds>" stands in as 3 text tokens
    row1 = text(5) + block(img, 1) + text(2)
    rows = [r + text(seq_len - len(r)) for r in (row0, row1)]
    input_ids = torch.tensor(rows)
    n_img = sum(t * h * w for t, h, w in IMAGE_GRIDS)
    n_vid = sum(t * h * w for t, h, w in VIDEO_GRIDS)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(n_img, PATCH_DIM, generator=g),
        image_grid_thw=torch.tensor(IMAGE_GRIDS),
        pixel_values_videos=torch.randn(n_vid, PATCH_DIM, generator=g),
        video_grid_thw=torch.tensor(VIDEO_GRIDS),
        mm_token_type_ids=((input_ids == img).int() + 2 * (input_ids == vid).int()),
    )


def text_batch(batch: int = 2, seq_len: int = 80, seed: int = 0) -> torch.Tensor:
    """Token ids [B, T] below the vision ids; T > 64 so the DeltaNet crosses a chunk boundary."""
    return torch.randint(0, 990, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())
