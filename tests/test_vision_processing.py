"""Resize, normalise, patchify and video sampling against transformers' Qwen2-VL / Qwen3-VL
processors (constructed locally; nothing downloaded)."""

import random
import types

import numpy as np
import pytest
import torch

from model.vision_processing import (patchify, process_image, process_video, sample_frame_indices,
                                     smart_resize, temporal_patch_timestamps)


def test_smart_resize_matches_transformers_image_and_video_rules():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_image
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video

    rng = random.Random(0)
    for _ in range(300):
        h, w = rng.randint(8, 3000), rng.randint(8, 3000)
        if max(h, w) / min(h, w) > 150:
            continue
        lo, hi = rng.choice([(256 * 256, 4096 * 4096), (32 * 32, 512 * 512), (128 * 32 * 32, 768 * 32 * 32)])
        got = smart_resize(h, w, 32, lo, hi)
        assert got == hf_image(h, w, factor=32, min_pixels=lo, max_pixels=hi)
        assert got[0] % 32 == 0 and got[1] % 32 == 0 and lo <= got[0] * got[1] <= hi
        f = rng.randint(2, 40)
        assert smart_resize(h, w, 32, lo, hi * f, num_frames=f, temporal_factor=2) == \
            hf_video(f, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi * f)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 4000)


def hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    size={"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096})


def test_image_patches_match_transformers_processor():
    """Exact when no resize is needed. On a smooth image that is resized, torch's uint8 bicubic
    kernel (PIL's fixed-point algorithm, with its own rounding) differs from PIL on under 2% of
    the values, by at most 2 grey levels."""
    from PIL import Image

    proc = hf_image_processor()
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:300, 0:500]
    smooth = np.stack([(127 + 120 * np.sin(xx / 17 + c) * np.cos(yy / 23)).astype(np.uint8)
                       for c in range(3)], -1)
    for arr, tol, share in ((exact, 0.0, 0.0), (smooth, 2.01, 0.02)):
        ref = proc(images=[Image.fromarray(arr)], return_tensors="pt")
        ours = process_image(torch.from_numpy(arr).permute(2, 0, 1))
        assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist()
        grey_levels = (ours.pixel_values - ref["pixel_values"]).abs() * 127.5
        assert grey_levels.max() <= tol
        assert (grey_levels > 0.5).float().mean() <= share


def test_patchify_layout_is_merge_block_order():
    """Patch i of the flat sequence holds the pixels of (row, col) in merge-block order, values
    ordered (C, Tp, P, P); the two frames of a still image are equal."""
    img = torch.rand(3, 64, 96)
    v = process_image(img, min_pixels=32 * 32)
    assert v.grid_thw == (1, 4, 6)
    x = (img - 0.5) / 0.5
    patches = v.pixel_values.view(24, 3, 2, 16, 16)
    torch.testing.assert_close(patches[:, :, 0], patches[:, :, 1])
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # first two blocks
    for i, (r, c) in enumerate(order):
        torch.testing.assert_close(patches[i, :, 0], x[:, 16 * r:16 * r + 16, 16 * c:16 * c + 16])
    with pytest.raises(ValueError, match="H, W of 32"):
        patchify(torch.zeros(2, 3, 48, 64))


def test_video_sampling_padding_and_timestamps():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    fake = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    for total, fps in ((23, 6.0), (300, 30.0), (7, 24.0), (1000, 25.0)):
        md = VideoMetadata(total_num_frames=total, fps=fps)
        ref = Qwen3VLVideoProcessor.sample_frames(fake, md).tolist()
        ours = sample_frame_indices(total, fps)
        assert ours == ref
        assert temporal_patch_timestamps(ours, fps) == pytest.approx(
            Qwen3VLProcessor._calculate_timestamps(None, ours, fps, 2))

    # 23 frames at 6 fps, sampled at 2 fps: 7 frames, padded to 8 with the last: 4 temporal patches.
    frames = torch.rand(23, 3, 64, 96)
    v = process_video(frames, video_fps=6.0, min_pixels=32 * 32)
    idx = sample_frame_indices(23, 6.0)
    assert len(idx) == 7 and v.grid_thw == (4, 4, 6) and v.kind == "video"
    assert v.timestamps == pytest.approx([(idx[2 * i] + idx[min(2 * i + 1, 6)]) / 12 for i in range(4)])
    last = v.pixel_values.view(4, 24, 3, 2, 256)[3]
    torch.testing.assert_close(last[:, :, 0], last[:, :, 1])  # the repeated frame
