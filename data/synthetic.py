"""Learnable synthetic multimodal shards for smoke runs: ``python -m data.synthetic --out DIR --seed S``.

Documents whose captions can only be predicted by looking:
- image-caption pairs: a shape on a plain background; the caption names its colour, its kind
  and where it sits on a 3 x 3 grid (" a red circle at the top left.");
- video-caption pairs: a square moving across a short clip (animated GIF, 4 fps); the caption
  names its colour, direction and speed (" the blue square moves up quickly.");
- interleaved documents: synthetic English (data/synthetic_text.py) with such images, clips and
  their captions in between;
- text-only documents (synthetic English).
Document i of seed S is a pure function of (S, i); the shards are byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import shutil
import tempfile

from PIL import Image, ImageDraw

from data.format import ShardSink, encode_sample
from data.synthetic_text import SyntheticText

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
           "yellow": (235, 220, 50), "white": (245, 245, 245), "orange": (245, 140, 30)}
KINDS = ("circle", "square", "triangle")
# 3 x 3 grid cells of a 96 x 96 image: one merged visual token (32 x 32 pixels) per cell.
POSITIONS = (("top left", "top", "top right"), ("left", "centre", "right"),
             ("bottom left", "bottom", "bottom right"))
IMAGE_SIZE = 96
# Side of a shape in pixels. Shapes that nearly fill their cell make its patches mostly one
# colour, which even the untrained tower maps to well-separated features: the colours are about
# twice as far apart (between- over within-colour variance) in the cell's merged token as with
# 18-28 pixel shapes.
SHAPE_SIZE = (28, 32)
VIDEO_SIZE, VIDEO_FRAMES, VIDEO_FPS, VIDEO_SQUARE = 64, 8, 4.0, 16
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slowly": 2, "quickly": 5}  # pixels per frame
# Documents of each kind. Image and video captions are ~20 tokens, text documents ~160 and
# interleaved ones ~330, so with these weights about half of the trained-on tokens follow an image
# or a video: enough caption signal for the smoke model to learn to look within its 200 steps.
KIND_WEIGHTS = (("image", 0.7), ("video", 0.15), ("interleaved", 0.08), ("text", 0.07))


def _background(rng: random.Random) -> tuple[int, int, int]:
    g = rng.randint(50, 110)
    return (g, g + rng.randint(-8, 8), g + rng.randint(-8, 8))


def shape_image(rng: random.Random) -> tuple[bytes, str]:
    """(PNG bytes, caption) of one shape image."""
    colour, kind = rng.choice(list(COLOURS)), rng.choice(KINDS)
    row, col = rng.randrange(3), rng.randrange(3)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background(rng))
    draw = ImageDraw.Draw(img)
    cell = IMAGE_SIZE // 3
    size = rng.randint(*SHAPE_SIZE)
    x0 = col * cell + rng.randint(0, cell - size)
    y0 = row * cell + rng.randint(0, cell - size)
    box = (x0, y0, x0 + size - 1, y0 + size - 1)
    fill = COLOURS[colour]
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    where = POSITIONS[row][col]
    return buf.getvalue(), f" a {colour} {kind} at the {where}."


def motion_video(rng: random.Random) -> tuple[bytes, str]:
    """(animated GIF bytes, caption) of a square moving in a straight line."""
    colour, direction, speed = rng.choice(list(COLOURS)), rng.choice(list(DIRECTIONS)), rng.choice(list(SPEEDS))
    dx, dy = DIRECTIONS[direction]
    step = SPEEDS[speed]
    travel = step * (VIDEO_FRAMES - 1)
    lo, hi = 0, VIDEO_SIZE - VIDEO_SQUARE

    def start(d: int) -> int:
        if d > 0:
            return rng.randint(lo, hi - travel)
        if d < 0:
            return rng.randint(lo + travel, hi)
        return rng.randint(lo, hi)

    x, y = start(dx), start(dy)
    bg = _background(rng)
    frames = []
    for f in range(VIDEO_FRAMES):
        img = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), bg)
        px, py = x + dx * step * f, y + dy * step * f
        ImageDraw.Draw(img).rectangle((px, py, px + VIDEO_SQUARE - 1, py + VIDEO_SQUARE - 1),
                                      fill=COLOURS[colour])
        frames.append(img)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                   duration=int(1000 / VIDEO_FPS), loop=0, optimize=False, disposal=1)
    return buf.getvalue(), f" the {colour} square moves {direction} {speed}."


def synthetic_sample(seed: int, index: int, text: SyntheticText) -> list[dict]:
    """Segments (with media bytes, see data/format.py:encode_sample) of document ``index``."""
    rng = random.Random(f"mm:{seed}:{index}")
    x, kind = rng.random(), "text"
    for name, w in KIND_WEIGHTS:
        if x < w:
            kind = name
            break
        x -= w
    if kind == "image":
        png, cap = shape_image(rng)
        return [{"image": png, "ext": "png"}, {"text": cap}]
    if kind == "video":
        gif, cap = motion_video(rng)
        return [{"video": gif, "ext": "gif", "fps": VIDEO_FPS}, {"text": cap}]
    body = text[index]
    if kind == "text":
        return [{"text": body}]
    paragraphs = body.split("\n\n")
    segs: list[dict] = [{"text": paragraphs[0] + "\n\n"}]
    for k in range(rng.randint(1, 3)):
        if rng.random() < 0.7:
            png, cap = shape_image(rng)
            segs += [{"text": "Look at this picture:"}, {"image": png, "ext": "png"}, {"text": cap + "\n\n"}]
        else:
            gif, cap = motion_video(rng)
            segs += [{"text": "Watch this clip:"}, {"video": gif, "ext": "gif", "fps": VIDEO_FPS},
                     {"text": cap + "\n\n"}]
        if k + 1 < len(paragraphs):
            segs.append({"text": paragraphs[k + 1] + "\n\n"})
    return segs


def write_synthetic(out_dir: str, seed: int, num_shards: int = 8, docs_per_shard: int = 256,
                    prefix: str = "shard", start: int = 0) -> list[str]:
    """Write ``num_shards`` shards of ``docs_per_shard`` documents; return their paths.

    Written under a temporary name and moved into place, so an interrupted run leaves no partial
    shard under a final name."""
    text = SyntheticText(seed)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=out_dir)
    try:
        paths = []
        for s in range(num_shards):
            sink = ShardSink(tmp, prefix=f"{prefix}-{s:06d}", max_bytes=1 << 62)
            for i in range(s * docs_per_shard, (s + 1) * docs_per_shard):
                idx = start + i
                sink.write(f"s{seed}-{idx:08d}", encode_sample(f"s{seed}-{idx:08d}",
                                                               synthetic_sample(seed, idx, text)))
            sink.close()
            final = os.path.join(out_dir, f"{prefix}-{s:06d}.tar")
            os.replace(sink.paths[0], final)
            paths.append(final)
        return paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_for_spec(spec: str, seed: int, docs_per_shard: int = 256) -> list[str]:
    """Write the shards a spec such as ``DIR/shard-{000000..000007}.tar`` names (the smoke run's
    ``data.generate_synthetic``)."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    names = [os.path.basename(u) for u in urls]
    m = re.fullmatch(r"(.+)-(\d{6})\.tar", names[0]) if names else None
    want = [f"{m.group(1)}-{i:06d}.tar" for i in range(len(urls))] if m else None
    if (not m or names != want or len({os.path.dirname(u) for u in urls}) != 1
            or "://" in spec or spec.startswith("pipe:")):
        raise ValueError(f"data.shards={spec!r}: data.generate_synthetic needs local shards named "
                         f"like DIR/shard-{{000000..000007}}.tar")
    out_dir = os.path.dirname(urls[0]) or "."
    import logging

    logging.getLogger("data").info("writing %d synthetic shards (seed %d) into %s", len(urls), seed, out_dir)
    return write_synthetic(out_dir, seed, len(urls), docs_per_shard, prefix=m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description="write learnable synthetic multimodal shards")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--num-shards", type=int, default=8)
    ap.add_argument("--docs-per-shard", type=int, default=256)
    ap.add_argument("--prefix", default="shard")
    ap.add_argument("--start", type=int, default=0, help="first document index (held-out sets)")
    args = ap.parse_args()
    paths = write_synthetic(args.out, args.seed, args.num_shards, args.docs_per_shard, args.prefix,
                            args.start)
    n = len(paths)
    spec = paths[0] if n == 1 else os.path.join(args.out, f"{args.prefix}-{{000000..{n - 1:06d}}}.tar")
    print(f"wrote {n} shards, {n * args.docs_per_shard} documents: data.shards='{spec}'")


if __name__ == "__main__":
    main()
