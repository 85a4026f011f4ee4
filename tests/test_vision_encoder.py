"""The vision tower against transformers' released Qwen3.5 vision model, packing, dtype, configs
and parameter counts."""

import dataclasses

import pytest
import torch

from model.config import ConfigError, load_model_config
from model.vision import VisionEncoder, packed_attention
from model.vision_config import VisionConfig

TINY = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, num_position_embeddings=64)
GRIDS = [[1, 4, 6], [2, 8, 4], [1, 2, 2], [1, 6, 6]]  # mixed sizes, a 2-temporal-patch video


def hf_vision(out_hidden=48, **kw):
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    cfg = Qwen3_5VisionConfig(out_hidden_size=out_hidden, patch_size=16, temporal_patch_size=2,
                              spatial_merge_size=2, **{**TINY, **kw})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3_5VisionModel(cfg).float().eval()
    # Weights well away from the 0.02-std init, so that every term (rotary, positions) matters.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def pixels_for(grids, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(seed))


def test_parity_with_transformers_qwen35_vision_model():
    """Same weights (the released parameter names load as is), fp32, several images of different
    sizes and a video packed together: the merged tokens agree to < 1e-4 relative error."""
    hf = hf_vision()
    ours = VisionEncoder(VisionConfig(**TINY), 48)
    ours.load_state_dict(hf.state_dict(), strict=True)
    grid = torch.tensor(GRIDS)
    px = pixels_for(GRIDS)
    with torch.no_grad():
        ref = hf(px, grid_thw=grid).pooler_output
        out = ours(px, grid)
    assert out.shape == (sum(t * h * w for t, h, w in GRIDS) // 4, 48)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_position_table_interpolation_matches_transformers():
    """The learned table resampled to non-square grids of other sizes than the table."""
    hf = hf_vision(num_position_embeddings=144)
    ours = VisionEncoder(VisionConfig(**{**TINY, "num_position_embeddings": 144}), 48)
    ours.load_state_dict(hf.state_dict())
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    grid = torch.tensor([[1, 2, 30], [2, 16, 4], [1, 14, 22]])
    idx, w = get_vision_interpolation_indices_and_weights(grid, 12, "bilinear", True, 2)
    ref = (hf.pos_embed(idx) * w[:, :, None]).sum(1)
    with torch.no_grad():
        torch.testing.assert_close(ours.position_embeddings(grid.tolist()), ref, rtol=1e-5, atol=1e-6)


def test_image_alone_equals_image_in_packed_batch():
    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(**TINY), 48).double()
    px = pixels_for(GRIDS).double()
    sizes = [t * h * w for t, h, w in GRIDS]
    with torch.no_grad():
        packed = enc(px, torch.tensor(GRIDS))
        alone = torch.cat([enc(p, torch.tensor([g])) for p, g in zip(px.split(sizes), GRIDS)])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-10)


def test_raw_uint8_patches_are_normalised_by_the_model():
    """The loader sends uint8 patches; the tower gives what it gives on the processors' normalised
    floats (model.vision_processing.normalize: (x / 255 - 0.5) / 0.5)."""
    from model.vision_processing import normalize

    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(**TINY), 48)
    n = sum(t * h * w for t, h, w in GRIDS)
    raw = torch.randint(0, 256, (n, 3 * 2 * 16 * 16), dtype=torch.uint8)
    floats = normalize(raw.view(n, 3, 2 * 16, 16)).view(n, -1)  # columns are (C, Tp, P, P)
    with torch.no_grad():
        torch.testing.assert_close(enc(raw, torch.tensor(GRIDS)), enc(floats, torch.tensor(GRIDS)),
                                   rtol=0, atol=0)


def test_packed_attention_is_per_segment():
    """Against a dense block-diagonal mask: segments of equal and of different lengths."""
    torch.manual_seed(0)
    cu = [0, 3, 10, 13, 13 + 7, 24]
    q, k, v = (torch.randn(24, 2, 8, dtype=torch.float64) for _ in range(3))
    seg = torch.repeat_interleave(torch.arange(5), torch.tensor(cu).diff())
    mask = seg[:, None] == seg[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(packed_attention(q, k, v, cu), ref)


def test_bf16_close_to_fp32():
    torch.manual_seed(0)
    enc = VisionEncoder(VisionConfig(**TINY), 48)
    px = pixels_for(GRIDS)
    with torch.no_grad():
        ref = enc(px, torch.tensor(GRIDS))
        out = enc.to(torch.bfloat16)(px.bfloat16(), torch.tensor(GRIDS)).float()
    assert ((out - ref).norm() / ref.norm()).item() < 0.03


def test_grid_and_pixel_count_mismatch_is_an_error():
    enc = VisionEncoder(VisionConfig(**TINY), 48)
    with pytest.raises(ValueError, match="pixel_values has 20 patches but grid_thw"):
        enc(torch.zeros(20, 1536), torch.tensor([[1, 4, 6]]))


def test_released_vision_parameter_count_matches_transformers():
    """Our Qwen3.5 vision config builds a tower of the size of transformers' default
    Qwen3_5VisionConfig (the released ViT) with the decoder width as merger output."""
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    from model.summary import summarize

    for name, width in (("qwen35_35b_a3b", 2048), ("qwen35_397b_a17b", 4096)):
        with torch.device("meta"):
            ref = Qwen3_5VisionModel(Qwen3_5VisionConfig(out_hidden_size=width))
        n_ref = sum(p.numel() for p in ref.parameters())
        info = summarize(name)
        assert info["vision_params"] == n_ref
        assert 0.4e9 < n_ref < 0.5e9


def test_configs_enable_vision_and_text_only_stays_text_only():
    assert load_model_config("tiny").vision is None
    assert load_model_config("qwen3_next_80b_a3b").vision is None
    vl = load_model_config("tiny_vl")
    tiny = load_model_config("tiny")
    assert vl.vision.depth == 2 and vl.num_layers == tiny.num_layers  # tiny_vl extends tiny
    assert (vl.vision.image_token_id, vl.vision.vision_start_token_id) == (4, 2)
    released = load_model_config("qwen35_397b_a17b").vision
    assert (released.depth, released.hidden_size, released.num_heads, released.intermediate_size) \
        == (27, 1152, 16, 4304)
    assert released.image_token_id == 248056 and released.hidden_act == "gelu_pytorch_tanh"


def test_vision_config_errors_name_the_field():
    cfg = load_model_config("tiny_vl")
    with pytest.raises(ConfigError, match=r"model.vision.hidden_size=30: must be divisible by "
                                          r"model.vision.num_heads=4"):
        dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, hidden_size=30,
                                                            num_heads=4)).validate()
    with pytest.raises(ConfigError, match=r"model.vision.image_token_id=5000: must be in \[0, "
                                          r"model.vocab_size=1024\)"):
        dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_token_id=5000)).validate()
    with pytest.raises(ConfigError, match="num_position_embeddings=50: must be a perfect square"):
        dataclasses.replace(cfg.vision, num_position_embeddings=50).validate()


def test_hydra_composes_a_vision_model():
    from train.main import load_config

    cfg = load_config(["model=tiny_vl", "model.vision.depth=3"])
    assert cfg.model.vision.depth == 3 and cfg.model.name == "tiny_vl"
    assert load_config(["model=tiny_vl", "model.vision=null"]).model.vision is None
    with pytest.raises(ConfigError, match="vision.num_heads"):
        load_config(["model=tiny_vl", "model.vision.num_heads=3"])
