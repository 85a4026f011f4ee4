"""model/vision_processing.py's `process_image` / `process_video`, reordered for the loader.

Same rules and same output values (the tests compare them), three changes of order:
- documents and batches keep their pixels as patchified **uint8** (a quarter of the bytes through
  the shuffle, the packer's carry, the worker queue and the host-to-device copy); the vision model
  normalises them on its device (`model.vision_processing.normalize_patches`);
- a still image stays **one frame** of patches, [h*w, C*P*P], until `batch_patches` writes the
  batch's pixel tensor, repeating it over the temporal patch in that one copy (instead of
  patchifying `temporal_patch_size` identical frames, then copying the result into the batch);
- patchify runs in numpy (`patchify_uint8`, same permutation): on these small uint8 arrays torch's
  per-op overhead was half of the cost (37 against 20 us for a 96x96 image).
Normalisation is elementwise and patchify a permutation, so the order does not change a value.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from model.vision_processing import (VisualInput, patch_layout, resize, smart_resize, video_plan,
                                     video_to_patches)


def patchify_uint8(frames: torch.Tensor, patch_size: int, temporal_patch_size: int,
                   merge_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """`model.vision_processing.patchify` for CPU uint8 frames [T, C, H, W] of any strides (e.g.
    a view of decoded [T, H, W, C] memory), in numpy: one strided copy.
    -> (patches [t*h*w, C*Tp*P*P], (t, h, w))."""
    lay = patch_layout(frames.shape, patch_size, temporal_patch_size, merge_size)
    a = np.ascontiguousarray(frames.numpy().reshape(lay.split).transpose(lay.order))
    return torch.from_numpy(a.reshape(lay.out)), lay.grid


def image_patches(image: torch.Tensor, patch_size: int, merge_size: int, min_pixels: int,
                  max_pixels: int) -> VisualInput:
    """One image [C, H, W] uint8 (any strides) -> VisualInput of **one frame** of uint8 patches
    [h*w, C*P*P], grid (1, h, w): `process_image` without its normalisation and without the
    repetition over the temporal patch, which `batch_patches` does."""
    height, width = smart_resize(image.shape[-2], image.shape[-1], patch_size * merge_size,
                                 min_pixels, max_pixels)
    pixels, grid = patchify_uint8(resize(image, height, width).unsqueeze(0), patch_size, 1, merge_size)
    return VisualInput(pixels, grid, "image")


def batch_patches(items: list[VisualInput], patch_size: int, temporal_patch_size: int) -> torch.Tensor:
    """The items' patches in order, as one [N, C*Tp*P*P] tensor: what `process_image` /
    `process_video` give, concatenated. uint8 images (`image_patches`' single frames) are repeated
    over the temporal patch while being copied; float items (made by model/vision_processing.py)
    are concatenated as they are."""
    if any(v.pixel_values.dtype != torch.uint8 for v in items):
        return torch.cat([v.pixel_values for v in items])
    pp = patch_size * patch_size
    repeat = temporal_patch_size if items[0].kind == "image" else 1
    cols = items[0].pixel_values.shape[1]
    out = np.empty((sum(v.pixel_values.shape[0] for v in items), cols // pp, repeat, pp), np.uint8)
    r = 0
    for v in items:
        n = v.pixel_values.shape[0]
        out[r:r + n] = v.pixel_values.numpy().reshape(n, cols // pp, 1, pp)  # broadcast over Tp
        r += n
    return torch.from_numpy(out.reshape(r, -1))


def video_patches_at(frames: torch.Tensor, indices: list[int], size: tuple[int, int],
                     clip_fps: float, patch_size: int, temporal_patch_size: int,
                     merge_size: int) -> VisualInput:
    """The kept frames [n, C, h, w] uint8 (at ``size`` already when the decoder scaled them, else
    resized here) of frame ``indices`` -> VisualInput of uint8 patches: `process_video`'s resize,
    temporal padding and patchify, without its normalisation."""
    return video_to_patches(frames, indices, size, clip_fps, patch_size, temporal_patch_size,
                            merge_size, patchify_fn=patchify_uint8)


def video_patches(frames: torch.Tensor, video_fps: float, fps: Optional[float], patch_size: int,
                  temporal_patch_size: int, merge_size: int, min_pixels: int, max_pixels: int,
                  min_frames: int, max_frames: int) -> VisualInput:
    """All decoded frames [F, C, H, W] uint8 (a view of [F, H, W, C] memory) of a clip at
    ``video_fps``, sampled at ``fps`` -> VisualInput of uint8 patches; `process_video` without its
    normalisation (`video_plan`, then `video_patches_at`)."""
    indices, size = video_plan(frames.shape[0], video_fps, frames.shape[-2], frames.shape[-1], fps,
                               patch_size, temporal_patch_size, merge_size, min_pixels, max_pixels,
                               min_frames, max_frames)
    # The kept frames, taken in the decoded [F, H, W, C] layout: torch's indexing of the
    # channels-first view cost 8x more (40 against 5 us for 4 of 8 64x64 frames).
    kept = torch.from_numpy(frames.permute(0, 2, 3, 1).numpy()[indices]).permute(0, 3, 1, 2)
    return video_patches_at(kept, indices, size, video_fps, patch_size, temporal_patch_size,
                            merge_size)
