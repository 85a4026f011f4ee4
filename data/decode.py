"""Media bytes -> uint8 tensors: images through pillow; videos through pillow (animated gif, webp,
png), else PyAV, else decord, decoded at the frames and size the budget keeps. Failures raise
BadSample with the counter they go to."""

from __future__ import annotations

import io
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageSequence

from data.format import BadSample

PILLOW_VIDEO = ("gif", "webp", "png", "apng")
# Decoding an image far over the budget costs time and memory for pixels that are thrown away:
# pillow's reducer (and JPEG draft mode) shrink it first, to at most this factor over the budget.
REDUCE_SLACK = 4


def _ext(key: str) -> str:
    return key.rsplit(".", 1)[-1].lower()


def decode_image(data: bytes, max_pixels: int) -> tuple[torch.Tensor, bool]:
    """Encoded image -> ([3, H, W] uint8, oversized). Oversized images (over ``max_pixels``) come
    back already reduced towards the budget; the exact resize is model/vision_processing's."""
    if not data:
        raise BadSample("bad_image", "zero-byte image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            oversized = w * h > max_pixels
            if oversized and img.format == "JPEG":
                img.draft("RGB", (max(1, int(w * (REDUCE_SLACK * max_pixels / (w * h)) ** 0.5)),
                                  max(1, int(h * (REDUCE_SLACK * max_pixels / (w * h)) ** 0.5))))
            if img.mode == "RGB":
                img.load()  # converting would only copy it; load() raises for a damaged file
            else:
                img = to_rgb(img)
            w, h = img.size
            factor = int((w * h / (REDUCE_SLACK * max_pixels)) ** 0.5)
            if factor >= 2:
                img = img.reduce(factor)
            arr = np.array(img)  # writable: torch warns on read-only arrays
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise BadSample("bad_image", f"undecodable image: {type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadSample("bad_image", f"image of shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), oversized


def to_rgb(img: Image.Image) -> Image.Image:
    """Any pillow mode -> 8-bit RGB as a viewer shows it. pillow's own convert("RGB") clips 16-bit
    and 32-bit grayscale to 255 (a white image), drops alpha (transparent pixels show whatever
    colour they hold, often black) and uses a subtractive CMYK formula; here deep grayscale is
    scaled, alpha is composited over white (as Qwen-VL's preprocessing does) and CMYK is
    multiplicative: R = (255 - C) * (255 - K) / 255."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        peak = a.max() if a.size else 0.0
        if mode == "F" and peak <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        elif mode.startswith("I;16") or peak > 255:
            a = a / (257.0 if mode.startswith("I;16") or peak <= 65535 else peak / 255.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK":
        c = np.asarray(img, dtype=np.float64)
        rgb = (255.0 - c[..., :3]) * (255.0 - c[..., 3:]) / 255.0
        return Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, YCbCr, LAB, HSV: pillow's conversion is the usual one


# (frames in the clip, its frame rate, height, width) -> (the frame indices to keep, the
# (height, width) to give them): model/vision_processing.py:video_plan, the budget's choice.
VideoPlan = Callable[[int, float, int, int], tuple[list[int], tuple[int, int]]]
# Decode forward to a wanted frame at most this many frames ahead; seek (to the keyframe before
# it) when it is further.
SEEK_AFTER = 48


def decode_video(data: bytes, key: str, fps_hint: float | None, plan: VideoPlan
                 ) -> tuple[torch.Tensor, float, list[int], tuple[int, int]]:
    """Encoded clip -> (the frames the plan keeps [n, 3, h, w] uint8, not contiguous; the clip's
    frames per second; their indices; the (height, width) the plan wants them at).

    Containers (mp4, webm, ...) are decoded at the plan's frames and size: PyAV (else decord)
    seeks to far frames, converts only the kept ones, scaled by the decoder (swscale, area
    filter); decord scales in its decoder and seeks. The frames then come at the wanted size already. Animated
    gif / webp / png (small) are decoded whole through pillow and keep their size (the caller
    resizes, exactly as model/vision_processing.py does)."""
    if not data:
        raise BadSample("bad_video", "zero-byte video")
    ext = _ext(key)
    try:
        if ext in PILLOW_VIDEO:
            frames, fps = _pillow_frames(data)
            if not frames:
                raise BadSample("bad_video", f"video {key!r} has no frames")
            fps = fps_hint or fps or 1.0
            indices, size = plan(len(frames), fps, *frames[0].shape[:2])
            frames = [frames[i] for i in indices]
        else:
            frames, fps, indices, size = _container_frames(data, fps_hint, plan)
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many types; any of them = bad video
        raise BadSample("bad_video", f"undecodable video {key!r}: {type(e).__name__}: {e}") from None
    if not frames:
        raise BadSample("bad_video", f"video {key!r} has no frames")
    # A [n, 3, h, w] view of the [n, h, w, 3] frames: patchify copies anyway.
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), float(fps), indices, size


def _pillow_frames(data: bytes) -> tuple[list[np.ndarray], float | None]:
    img = Image.open(io.BytesIO(data))
    frames, durations = [], []
    for frame in ImageSequence.Iterator(img):
        # GIF frames after the first come as RGB already: converting those would only copy them.
        frames.append(np.asarray(frame if frame.mode == "RGB" else to_rgb(frame)))
        durations.append(frame.info.get("duration") or 0)
    mean_ms = sum(durations) / len(durations) if durations else 0
    return frames, (1000.0 / mean_ms if mean_ms > 0 else None)


def _container_frames(data: bytes, fps_hint: float | None, plan: VideoPlan):
    # PyAV first, decord where PyAV is missing: on a 40 s 640x480 H.264 clip both took 0.9 s for
    # the smoke budget's 64 kept frames (BENCHMARKS.md, bench_video.py).
    try:
        return av_frames(data, fps_hint, plan)
    except ImportError:
        pass
    try:
        return decord_frames(data, fps_hint, plan)
    except ImportError:
        raise BadSample("no_video_decoder", "no video decoder: pip install '.[video]' (decord "
                                            "or PyAV) to read this video") from None


def decord_frames(data: bytes, fps_hint: float | None = None, plan: Optional[VideoPlan] = None):
    """(frames [h, w, 3] uint8 the plan keeps, fps, their indices, (h, w)) through decord, which
    seeks and scales in its decoder; no plan: every frame at its size."""
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    total = len(vr)
    fps = fps_hint or float(vr.get_avg_fps()) or 1.0
    height, width = vr[0].shape[:2]
    indices, size = (list(range(total)), (height, width)) if plan is None else plan(total, fps, height, width)
    if size != (height, width):
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), width=size[1], height=size[0])
    return list(vr.get_batch(indices).asnumpy()), fps, indices, size


def av_frames(data: bytes, fps_hint: float | None = None, plan: Optional[VideoPlan] = None):
    """(frames [h, w, 3] uint8 the plan keeps, fps, their indices, (h, w)) through PyAV: frames
    far ahead are reached by a seek, and only kept frames are converted, scaled by swscale. A clip
    whose length the container does not say is decoded whole first. No plan: every frame."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else None
        fps = fps_hint or rate or 1.0
        height, width = stream.codec_context.height, stream.codec_context.width
        total = stream.frames
        if not total and stream.duration and rate:
            total = int(float(stream.duration * stream.time_base) * rate + 0.5)
        if plan is None or not total or not rate:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            if plan is None:
                return frames, fps, list(range(len(frames))), (height, width)
            indices, size = plan(len(frames), fps, height, width)
            return [frames[i] for i in indices], fps, indices, size
        indices, size = plan(total, fps, height, width)
        return _av_at(container, stream, rate, indices, size), fps, indices, size


def _av_at(container, stream, rate: float, indices: list[int], size: tuple[int, int]) -> list[np.ndarray]:
    """The frames at ``indices`` (sorted), [h, w, 3] at ``size``; a frame the stream lacks (it
    ends early, or skips timestamps) is the next one decoded, or the last."""
    start, base = stream.start_time or 0, float(stream.time_base)
    got: dict[int, np.ndarray] = {}
    want = sorted(set(indices))
    k, pos, sought = 0, -1, -1
    frames = container.decode(stream)
    last = None
    while k < len(want):
        if want[k] - pos > SEEK_AFTER and sought != want[k]:
            sought = want[k]
            container.seek(start + int(want[k] / rate / base), stream=stream, backward=True)
            frames = container.decode(stream)
        frame = next(frames, None)
        if frame is None:
            break
        last = frame
        pos = round((frame.pts - start) * base * rate) if frame.pts is not None else pos + 1
        if pos >= want[k]:
            rgb = frame.to_ndarray(width=size[1], height=size[0], format="rgb24", interpolation="AREA")
            while k < len(want) and pos >= want[k]:
                got[want[k]] = rgb
                k += 1
    if not got and last is None:
        return []
    if k < len(want):  # the stream ended before the frames its header promised
        rgb = got[want[k - 1]] if k else last.to_ndarray(width=size[1], height=size[0],
                                                          format="rgb24", interpolation="AREA")
        for t in want[k:]:
            got[t] = rgb
    return [got[i] for i in indices]


def has_video_decoder() -> bool:
    """Whether non-pillow containers (mp4, webm, ...) can be decoded here."""
    for name in ("decord", "av"):
        try:
            __import__(name)
            return True
        except ImportError:
            pass
    return False
