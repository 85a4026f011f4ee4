"""Images and videos -> the vision tower's input: resize to the patch grid, normalise, patchify.

The model's input contract, shared by the data pipeline and generation code. Pure torch; decoding
(pillow, decord, PyAV) happens before, in data/. The rules are the released Qwen2-VL-family ones:

- `smart_resize`: both sides become multiples of patch * merge (32), the pixel count is kept in
  [min_pixels, max_pixels], the aspect ratio as close as rounding allows.
- normalise with mean = std = 0.5 per channel (Qwen3-VL / Qwen3.5 preprocessor config).
- still images are repeated to `temporal_patch_size` (2) frames: one temporal patch.
- videos: frames sampled uniformly at a target fps (at least `min_frames`), padded to an even count
  by repeating the last frame; each pair of frames is one temporal patch, whose timestamp is the
  mean time of its two frames (what the token layout writes as "<t seconds>").
- patchify: `[T, C, H, W]` -> `[t*h*w, C*Tp*P*P]` in merge-block order (see model/vision.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# Released Qwen3-VL/Qwen3.5 image budget ("shortest_edge"/"longest_edge" of its preprocessor).
IMAGE_MIN_PIXELS = 256 * 256
IMAGE_MAX_PIXELS = 4096 * 4096
# transformers' Qwen3VLVideoProcessor defaults: a budget over all frames together.
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768


@dataclass
class VisualInput:
    """One processed image or video: what the vision tower and the token layout need.

    pixel_values: [t*h*w, C*Tp*P*P]; grid_thw: (t, h, w) in patches; kind: "image" | "video";
    timestamps: seconds, one per temporal patch (videos only).
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    kind: str = "image"
    timestamps: list[float] = field(default_factory=list)


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS, num_frames: int = 1,
                 temporal_factor: int = 1) -> tuple[int, int]:
    """(height, width) -> (H, W), multiples of `factor`, with num_frames' * H * W within the
    budget, where num_frames' is num_frames rounded to temporal_factor (1 frame for images).

    The image rule of transformers' Qwen2-VL `smart_resize`; with num_frames > 1, its Qwen3-VL
    video variant, which first scales frames smaller than `factor` up to it.
    """
    if num_frames > 1 and (height < factor or width < factor):
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a "
                         f"{height}x{width} image exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[..., C, H, W] uint8 or float -> same dtype at (height, width).

    Bicubic with antialiasing, which torch implements with PIL's kernel (a = -0.5). uint8 input
    goes through torch's uint8 kernel, PIL's fixed-point algorithm (what PIL, and torchvision on
    uint8 tensors, compute; 6-7x faster than resizing in float, fastest on channels-last memory,
    which decoded [H, W, C] images are).
    """
    if frames.shape[-2:] == (height, width):
        return frames
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:])
    if x.dtype != torch.uint8:
        x = x.float()
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.reshape(*lead, *x.shape[-3:]).to(frames.dtype)


def normalize(frames: torch.Tensor, mean: Sequence[float] = IMAGE_MEAN,
              std: Sequence[float] = IMAGE_STD) -> torch.Tensor:
    """[..., C, H, W] uint8 (0..255) or float (0..1) -> float32 (x - mean) / std per channel."""
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t


def normalize_patches(pixels: torch.Tensor, mean: Sequence[float] = IMAGE_MEAN,
                      std: Sequence[float] = IMAGE_STD) -> torch.Tensor:
    """uint8 patches [N, C*Tp*P*P] (columns ordered C, Tp, P, P) -> float32 (x / 255 - mean) / std
    per channel: `normalize`'s values (same operations, same order; patchify is a permutation), on
    whole batches of patches, on whatever device the patches are."""
    x = pixels.float()
    x.div_(255.0)
    if len(set(mean)) == 1 and len(set(std)) == 1:  # the released 0.5s: scalar ops, no broadcast
        return x.sub_(mean[0]).div_(std[0])
    c = len(mean)
    view = x.view(x.shape[0], c, -1)
    view.sub_(torch.tensor(mean, dtype=torch.float32, device=x.device).view(c, 1))
    view.div_(torch.tensor(std, dtype=torch.float32, device=x.device).view(c, 1))
    return x


@dataclass(frozen=True)
class PatchLayout:
    """How `patchify` rearranges frames [T, C, H, W]: view them as `split`, permute the dims by
    `order`, flatten to `out`; `grid` = (t, h, w) in patches."""

    split: tuple[int, ...]
    order: tuple[int, ...]
    out: tuple[int, int]
    grid: tuple[int, int, int]


def patch_layout(shape: Sequence[int], patch_size: int, temporal_patch_size: int,
                 merge_size: int) -> PatchLayout:
    T, C, H, W = shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    if T % tp or H % (p * m) or W % (p * m):
        raise ValueError(f"frames {tuple(shape)}: T must be a multiple of {tp} and H, W of "
                         f"{p * m} (patch {p} x merge {m}); resize and pad first")
    t, h, w = T // tp, H // p, W // p
    # [t, Tp, C, block_row, row_in_block, P, block_col, col_in_block, P]
    # -> [t, block_row, block_col, row_in_block, col_in_block, C, Tp, P, P]
    return PatchLayout((t, tp, C, h // m, m, p, w // m, m, p), (0, 3, 6, 4, 7, 2, 1, 5, 8),
                       (t * h * w, C * tp * p * p), (t, h, w))


def patchify(frames: torch.Tensor, patch_size: int = 16, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] (T a multiple of temporal_patch_size, H and W of patch*merge) ->
    (pixel_values [t*h*w, C*Tp*P*P], (t, h, w)), patches in merge-block order and each patch's
    values ordered (C, Tp, P, P) as the Conv3d patch embedding reads them."""
    lay = patch_layout(frames.shape, patch_size, temporal_patch_size, merge_size)
    return frames.reshape(lay.split).permute(lay.order).reshape(lay.out), lay.grid


def process_image(image: torch.Tensor, patch_size: int = 16, temporal_patch_size: int = 2,
                  merge_size: int = 2, min_pixels: int = IMAGE_MIN_PIXELS,
                  max_pixels: int = IMAGE_MAX_PIXELS, mean: Sequence[float] = IMAGE_MEAN,
                  std: Sequence[float] = IMAGE_STD) -> VisualInput:
    """One image [C, H, W] (uint8 0..255 or float 0..1) -> VisualInput with grid (1, h, w)."""
    height, width = smart_resize(image.shape[-2], image.shape[-1], patch_size * merge_size,
                                 min_pixels, max_pixels)
    x = normalize(resize(image, height, width), mean, std)
    # A still image is a video of identical frames filling one temporal patch.
    frames = x.unsqueeze(0).expand(temporal_patch_size, -1, -1, -1)
    pixels, grid = patchify(frames, patch_size, temporal_patch_size, merge_size)
    return VisualInput(pixels, grid, "image")


def sample_frame_indices(total_frames: int, video_fps: float, fps: float = VIDEO_FPS,
                         min_frames: int = VIDEO_MIN_FRAMES,
                         max_frames: int = VIDEO_MAX_FRAMES) -> list[int]:
    """Indices of the frames kept at `fps` frames per second, uniformly spread over the clip
    (transformers' Qwen3VLVideoProcessor.sample_frames)."""
    n = int(total_frames / video_fps * fps)
    n = min(max(n, min_frames), max_frames, total_frames)
    return torch.linspace(0, total_frames - 1, n, dtype=torch.float64).round().long().tolist()


def temporal_patch_timestamps(indices: Sequence[int], video_fps: float,
                              temporal_patch_size: int = 2) -> list[float]:
    """Seconds per temporal patch: the mean time of its frames, the index list padded with its last
    frame to a multiple of temporal_patch_size first (as the frames are)."""
    idx = list(indices)
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    times = [i / video_fps for i in idx]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(times), temporal_patch_size)]


def process_video(frames: torch.Tensor, video_fps: float, fps: Optional[float] = VIDEO_FPS,
                  patch_size: int = 16, temporal_patch_size: int = 2, merge_size: int = 2,
                  min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                  min_frames: int = VIDEO_MIN_FRAMES, max_frames: int = VIDEO_MAX_FRAMES,
                  mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD) -> VisualInput:
    """Decoded frames [F, C, H, W] at `video_fps` -> VisualInput (kind "video") with grid (t, h, w)
    and one timestamp per temporal patch. fps=None keeps every frame."""
    indices, size = video_plan(frames.shape[0], video_fps, frames.shape[-2], frames.shape[-1], fps,
                               patch_size, temporal_patch_size, merge_size, min_pixels, max_pixels,
                               min_frames, max_frames)
    return video_to_patches(frames[indices], indices, size, video_fps, patch_size, temporal_patch_size,
                            merge_size, transform=lambda x: normalize(x, mean, std))


def video_plan(total: int, clip_fps: float, height: int, width: int, sample_fps: Optional[float],
               patch_size: int, temporal_patch_size: int, merge_size: int, min_pixels: int,
               max_pixels: int, min_frames: int, max_frames: int) -> tuple[list[int], tuple[int, int]]:
    """What `process_video` keeps of a clip of ``total`` frames of height x width at ``clip_fps``:
    (the frame indices sampled at ``sample_fps``, None = all, and the (height, width) it resizes
    them to within the budget). The loader's decoder (data/decode.py) decodes just these."""
    indices = video_frame_indices(total, clip_fps, sample_fps, min_frames, max_frames)
    size = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels,
                        num_frames=len(indices), temporal_factor=temporal_patch_size)
    return indices, size


def video_frame_indices(total_frames: int, video_fps: float, fps: Optional[float], min_frames: int,
                        max_frames: int) -> list[int]:
    """The frames `process_video` keeps: `sample_frame_indices`, or all of them when fps is None."""
    if fps is None:
        return list(range(total_frames))
    return sample_frame_indices(total_frames, video_fps, fps, min_frames, max_frames)


def video_to_patches(frames: torch.Tensor, indices: Sequence[int], size: tuple[int, int],
                     video_fps: float, patch_size: int, temporal_patch_size: int, merge_size: int,
                     transform: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                     patchify_fn: Callable[..., tuple[torch.Tensor, tuple[int, int, int]]] = patchify
                     ) -> VisualInput:
    """`process_video`'s steps after `video_plan` (resize to `size`, pad to the temporal patch,
    patchify): `frames` [len(indices), C, h, w] are the clip's frames at `indices` (at `size`
    already when the decoder scaled them). `transform` is applied to the resized frames:
    normalisation, or nothing for data/pixels.py, which keeps uint8 patches (the model normalises
    them) and patchifies them with its own `patchify_fn` (same signature and result as `patchify`)."""
    x = transform(resize(frames, *size))
    if pad := -x.shape[0] % temporal_patch_size:  # an odd count: repeat the last frame
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    pixels, grid = patchify_fn(x, patch_size, temporal_patch_size, merge_size)
    return VisualInput(pixels, grid, "video",
                       temporal_patch_timestamps(indices, video_fps, temporal_patch_size))
