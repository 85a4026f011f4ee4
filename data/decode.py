"""Media bytes -> uint8 tensors: images through pillow; videos through pillow (animated gif, webp,
png), else decord, else PyAV. Failures raise BadSample with the counter they go to."""

from __future__ import annotations

import io
import warnings

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


def decode_video(data: bytes, key: str, fps_hint: float | None = None) -> tuple[torch.Tensor, float]:
    """Encoded clip -> (frames [F, 3, H, W] uint8, not contiguous, frames per second)."""
    if not data:
        raise BadSample("bad_video", "zero-byte video")
    ext = _ext(key)
    try:
        if ext in PILLOW_VIDEO:
            frames, fps = _pillow_frames(data)
        else:
            frames, fps = _decord_or_av(data)
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many types; any of them = bad video
        raise BadSample("bad_video", f"undecodable video {key!r}: {type(e).__name__}: {e}") from None
    if not frames:
        raise BadSample("bad_video", f"video {key!r} has no frames")
    fps = fps_hint or fps or 1.0
    # A [F, 3, H, W] view of the [F, H, W, 3] frames: frame sampling and patchify copy anyway.
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), float(fps)


def _pillow_frames(data: bytes) -> tuple[list[np.ndarray], float | None]:
    img = Image.open(io.BytesIO(data))
    frames, durations = [], []
    for frame in ImageSequence.Iterator(img):
        # GIF frames after the first come as RGB already: converting those would only copy them.
        frames.append(np.asarray(frame if frame.mode == "RGB" else to_rgb(frame)))
        durations.append(frame.info.get("duration") or 0)
    mean_ms = sum(durations) / len(durations) if durations else 0
    return frames, (1000.0 / mean_ms if mean_ms > 0 else None)


def _decord_or_av(data: bytes) -> tuple[list[np.ndarray], float | None]:
    try:
        return decord_frames(data)
    except ImportError:
        pass
    try:
        return av_frames(data)
    except ImportError:
        raise BadSample("no_video_decoder", "no video decoder: pip install '.[video]' (decord "
                                            "or PyAV) to read this video") from None


def decord_frames(data: bytes) -> tuple[list[np.ndarray], float | None]:
    """Every frame [H, W, 3] uint8 of a clip, and its frame rate, through decord."""
    import decord

    vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    batch = vr.get_batch(list(range(len(vr)))).asnumpy()
    return list(batch), float(vr.get_avg_fps())


def av_frames(data: bytes) -> tuple[list[np.ndarray], float | None]:
    """Every frame [H, W, 3] uint8 of a clip, and its frame rate, through PyAV."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return frames, fps


def has_video_decoder() -> bool:
    """Whether non-pillow containers (mp4, webm, ...) can be decoded here."""
    for name in ("decord", "av"):
        try:
            __import__(name)
            return True
        except ImportError:
            pass
    return False
