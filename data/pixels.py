"""model/vision_processing.py's `process_image` / `process_video`, reordered for the loader.

Same rules and same output values (the tests compare them), two changes of order:
- documents keep their pixels as patchified **uint8** (a quarter of the bytes through the shuffle,
  the packer's carry and the worker queue) and `normalize_patches` turns a whole batch into the
  model's float input at collate time, in one pass per op instead of several small ops per image;
- a still image is patchified once and then repeated over the temporal patch, instead of
  patchifying `temporal_patch_size` identical frames (the strided copy is the expensive part).
Normalisation is elementwise and patchify a permutation, so the order does not change a value.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from model.vision_processing import (IMAGE_MEAN, IMAGE_STD, VisualInput, patchify, resize,
                                     smart_resize, video_to_patches)


def image_patches(image: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int,
                  min_pixels: int, max_pixels: int) -> VisualInput:
    """One image [C, H, W] uint8 (any strides) -> VisualInput of uint8 patches
    [h*w, C*Tp*P*P], grid (1, h, w); `process_image` without its normalisation."""
    height, width = smart_resize(image.shape[-2], image.shape[-1], patch_size * merge_size,
                                 min_pixels, max_pixels)
    x = resize(image, height, width)
    one, (_, h, w) = patchify(x.unsqueeze(0), patch_size, 1, merge_size)  # [N, C*P*P]
    c = x.shape[0]
    # (C, P*P) -> (C, Tp, P*P): the frame repeated over the temporal patch, columns (C, Tp, P, P).
    pixels = one.view(-1, c, 1, patch_size * patch_size).expand(-1, -1, temporal_patch_size, -1)
    return VisualInput(pixels.reshape(one.shape[0], -1), (1, h, w), "image")


def video_patches(frames: torch.Tensor, video_fps: float, fps: Optional[float], patch_size: int,
                  temporal_patch_size: int, merge_size: int, min_pixels: int, max_pixels: int,
                  min_frames: int, max_frames: int) -> VisualInput:
    """Decoded frames [F, C, H, W] uint8 -> VisualInput of uint8 patches; `process_video` without
    its normalisation."""
    return video_to_patches(frames, video_fps, fps, patch_size, temporal_patch_size, merge_size,
                            min_pixels, max_pixels, min_frames, max_frames)


def normalize_patches(pixels: torch.Tensor, mean: Sequence[float] = IMAGE_MEAN,
                      std: Sequence[float] = IMAGE_STD) -> torch.Tensor:
    """uint8 patches [N, C*Tp*P*P] -> float32 (x / 255 - mean) / std per channel: the values of
    `model.vision_processing.normalize`, whose operations it repeats, in place."""
    x = pixels.float()
    x.div_(255.0)
    if len(set(mean)) == 1 and len(set(std)) == 1:  # the released 0.5s: scalar ops, no broadcast
        return x.sub_(mean[0]).div_(std[0])
    c = len(mean)
    view = x.view(x.shape[0], c, -1)  # columns are (C, Tp, P, P)
    view.sub_(torch.tensor(mean, dtype=torch.float32).view(c, 1))
    view.div_(torch.tensor(std, dtype=torch.float32).view(c, 1))
    return x
