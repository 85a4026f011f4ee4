"""Build shards from files: ``python -m data.write --out DIR [--manifest F.jsonl ...] [--folder D ...]``.

Inputs (each becomes one document, i.e. one sample; see data/format.py):
- a JSONL manifest, one object per line, media paths relative to the manifest's directory:
  ``{"image": "a.jpg", "caption": "..."}`` (image-caption pair),
  ``{"video": "v.mp4", "caption": "...", "fps": 25}`` (video-caption pair),
  ``{"text": "..."}`` (plain text),
  ``{"segments": [{"text": "..."}, {"image": "a.jpg"}, {"video": "v.mp4", "fps": 25}, ...]}``
  (an interleaved document);
- a folder: each image or video with a caption file of the same stem (``a.jpg`` + ``a.txt``) is a
  pair; a ``.txt`` alone is plain text; media without a caption are image/video-only documents.

Shards are ``DIR/<prefix>-NNNNNN.tar`` of about ``--shard-size`` bytes. Inputs that cannot be used
(a missing or empty file, an image pillow cannot open, a bad manifest line, an empty document) are
skipped and reported; the counts are printed, and the ``data.shards`` value to train on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Any, Iterator

from data.format import ShardSink, encode_sample

IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"}
VIDEO_EXTS = {"mp4", "webm", "mkv", "avi", "mov", "gif"}


class Skip(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _ext(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def _media(kind: str, path: str, fps: Any = None) -> dict[str, Any]:
    ext = _ext(path)
    allowed = IMAGE_EXTS if kind == "image" else VIDEO_EXTS
    if ext not in allowed:
        raise Skip(f"bad_{kind}", f"{path}: extension {ext!r} is not one of {sorted(allowed)}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Skip("missing_file", f"{path}: {e.strerror}") from None
    if not data:
        raise Skip(f"bad_{kind}", f"{path}: empty file")
    if kind == "image":
        import io

        from PIL import Image

        try:
            Image.open(io.BytesIO(data)).verify()
        except Exception as e:  # noqa: BLE001 - pillow raises many types for a broken file
            raise Skip("bad_image", f"{path}: not an image pillow can open ({e})") from None
    seg = {kind: data, "ext": ext}
    if kind == "video" and isinstance(fps, (int, float)) and fps > 0:
        seg["fps"] = float(fps)
    return seg


def manifest_documents(path: str) -> Iterator[tuple[str, Any]]:
    """(where, segments | Skip) per manifest line."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise Skip("invalid_json", "a line must be a JSON object")
                yield where, _manifest_segments(obj, base)
            except json.JSONDecodeError as e:
                yield where, Skip("invalid_json", str(e))
            except Skip as e:
                yield where, e


def _manifest_segments(obj: dict, base: str) -> list[dict[str, Any]]:
    def p(rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.join(base, rel)

    if "segments" in obj:
        if not isinstance(obj["segments"], list):
            raise Skip("invalid_json", "'segments' must be a list")
        segs = []
        for s in obj["segments"]:
            if not isinstance(s, dict):
                raise Skip("invalid_json", "each segment must be an object")
            if "text" in s:
                if s["text"]:
                    segs.append({"text": str(s["text"])})
            elif "image" in s:
                segs.append(_media("image", p(s["image"])))
            elif "video" in s:
                segs.append(_media("video", p(s["video"]), s.get("fps")))
            else:
                raise Skip("invalid_json", f"segment {s!r} has none of text, image, video")
        return segs
    segs = []
    if "image" in obj:
        segs.append(_media("image", p(obj["image"])))
    elif "video" in obj:
        segs.append(_media("video", p(obj["video"]), obj.get("fps")))
    text = obj.get("caption", obj.get("text"))
    if text:
        segs.append({"text": (" " + text) if segs and not text.startswith((" ", "\n")) else text})
    if not segs and not any(k in obj for k in ("image", "video", "caption", "text")):
        raise Skip("invalid_json", "needs one of image, video, text, caption, segments")
    return segs


def folder_documents(folder: str) -> Iterator[tuple[str, Any]]:
    by_stem: dict[str, list[str]] = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            stem = os.path.join(root, name.rsplit(".", 1)[0] if "." in name else name)
            by_stem.setdefault(stem, []).append(os.path.join(root, name))
    for stem in sorted(by_stem):
        paths = by_stem[stem]
        try:
            segs = []
            for path in paths:
                ext = _ext(path)
                if ext in IMAGE_EXTS:
                    segs.append(_media("image", path))
                elif ext in VIDEO_EXTS:
                    segs.append(_media("video", path))
            txt = [q for q in paths if _ext(q) == "txt"]
            unknown = [q for q in paths if _ext(q) not in IMAGE_EXTS | VIDEO_EXTS | {"txt"}]
            if unknown and not segs and not txt:
                raise Skip("unknown_file", f"{unknown[0]}: not an image, video or .txt")
            if txt:
                with open(txt[0], encoding="utf-8") as f:
                    text = f.read().strip()
                if text:
                    segs.append({"text": (" " + text) if segs else text})
            yield stem, segs
        except Skip as e:
            yield stem, e
        except UnicodeDecodeError as e:
            yield stem, Skip("bad_text", str(e))


def write_shards(out: str, manifests: list[str], folders: list[str], shard_size: int,
                 prefix: str = "shard", log=print) -> tuple[ShardSink, Counter, Counter]:
    """Write every usable input; return (sink, written counts by document kind, skipped by kind)."""
    sink = ShardSink(out, prefix, shard_size)
    written, skipped = Counter(), Counter()
    inputs = [manifest_documents(m) for m in manifests] + [folder_documents(d) for d in folders]
    n = 0
    for it in inputs:
        for where, segs in it:
            if isinstance(segs, Skip):
                skipped[segs.kind] += 1
                log(f"skipped {where}: {segs.kind}: {segs}")
                continue
            if not segs:
                skipped["empty_document"] += 1
                log(f"skipped {where}: empty_document")
                continue
            kinds = {k for s in segs for k in ("text", "image", "video") if k in s}
            kind = ("interleaved" if len(segs) > 2 or kinds == {"image", "video", "text"}
                    else "+".join(sorted(kinds)))
            sink.write(f"{n:09d}", encode_sample(f"{n:09d}", segs))
            written[kind] += 1
            n += 1
    sink.close()
    return sink, written, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--manifest", action="append", default=[], help="JSONL manifest (repeatable)")
    ap.add_argument("--folder", action="append", default=[], help="folder of files (repeatable)")
    ap.add_argument("--shard-size", type=float, default=256, help="target shard size in MB")
    ap.add_argument("--prefix", default="shard")
    args = ap.parse_args(argv)
    if not args.manifest and not args.folder:
        ap.error("give at least one --manifest or --folder")
    for m in args.manifest:
        if not os.path.isfile(m):
            ap.error(f"--manifest {m!r} is not a file")
    for d in args.folder:
        if not os.path.isdir(d):
            ap.error(f"--folder {d!r} is not a directory")
    sink, written, skipped = write_shards(args.out, args.manifest, args.folder,
                                          int(args.shard_size * (1 << 20)), args.prefix,
                                          log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {sink.samples} documents into {len(sink.paths)} shards: "
          + ", ".join(f"{k} {v}" for k, v in sorted(written.items())))
    print(f"skipped {sum(skipped.values())} inputs"
          + (": " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) if skipped else ""))
    if sink.paths:
        print(f"data.shards='{sink.spec()}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
