"""The shard format: one webdataset sample = one document.

A sample is the files ``<key>.json`` and ``<key>.<media key>`` in a tar shard (webdataset groups
consecutive files by the part of the name before the first dot). The JSON holds the document's
ordered segments; media segments name their file by its media key::

    {"segments": [{"text": "A photo of "},
                  {"image": "1.png"},
                  {"text": " a red circle."},
                  {"video": "3.gif", "fps": 4.0}],
     "source": "optional free-form provenance"}

- ``text``: a string (tokenised as is; the packer appends end-of-document).
- ``image``: a media key; any format pillow opens (png, jpg, webp, ...).
- ``video``: a media key; animated gif/webp/png through pillow, anything else (mp4, webm, mkv) through
  decord or PyAV. ``fps`` (optional) is the clip's frame rate when the file does not carry one.

Image-caption pairs are ``[image, text]``, plain text is ``[text]``.

Shards in the common caption layouts are read as they are, with a metadata ``<key>.json`` without
segments, or none:
- img2dataset: ``<key>.jpg`` (or ``.png`` / ``.webp``) and the caption in ``<key>.txt`` ->
  ``[image, text]``;
- video2dataset: ``<key>.mp4`` (or ``.webm`` / ``.mkv`` / ``.mov`` / ``.avi``) and ``<key>.txt`` ->
  ``[video, text]``;
- plain text: ``<key>.txt`` alone -> ``[text]``.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

SEGMENT_KINDS = ("text", "image", "video")
PAIR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # an img2dataset sample's image, with its .txt
PAIR_VIDEO_KEYS = ("mp4", "webm", "mkv", "mov", "avi")  # a video2dataset sample's clip


class BadSample(Exception):
    """A sample (or shard) that is skipped; ``kind`` is the counter it goes to."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class DataError(RuntimeError):
    """The data cannot feed the run (e.g. a source whose samples are all bad): stops it with one
    line naming the source."""


def encode_sample(key: str, segments: list[dict[str, Any]], source: str | None = None) -> dict[str, bytes]:
    """Segments with media bytes -> the files of one sample (name without key -> bytes).

    ``segments``: ``{"text": str}``, ``{"image": bytes, "ext": "png"}`` or
    ``{"video": bytes, "ext": "gif", "fps": float}``. Media get keys ``"<segment index>.<ext>"``.
    """
    files: dict[str, bytes] = {}
    out = []
    for i, seg in enumerate(segments):
        if "text" in seg:
            out.append({"text": seg["text"]})
            continue
        kind = "image" if "image" in seg else "video"
        media_key = f"{i}.{seg['ext'].lower()}"
        files[media_key] = seg[kind]
        entry = {kind: media_key}
        if kind == "video" and seg.get("fps"):
            entry["fps"] = float(seg["fps"])
        out.append(entry)
    meta = {"segments": out}
    if source:
        meta["source"] = source
    files["json"] = json.dumps(meta, ensure_ascii=False).encode()
    if "__key__" in files or "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.'")
    return files


def parse_sample(sample: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw sample (``json`` plus media keys -> bytes) -> segments, each ``{"text": str}``,
    ``{"image": bytes, "key": k}`` or ``{"video": bytes, "key": k, "fps": float | None}``.

    Raises BadSample: split_sample, missing_json, invalid_json, invalid_text, missing_key,
    empty_document.
    """
    if sample.get("__split__"):
        raise BadSample("split_sample", "more files of this key come after other samples' files: "
                        "webdataset reads a sample's files only when they are adjacent in the tar; "
                        "write shards with `python -m data.write`, or `tar --sort=name -cf ...`")
    pair = _image_caption_pair(sample)
    if "json" not in sample:
        if pair:
            return pair
        raise BadSample("missing_json", "sample has no .json file")
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("invalid_json", f"not JSON: {e}") from None
    segs = meta.get("segments") if isinstance(meta, dict) else None
    if not isinstance(segs, list):
        if pair:  # img2dataset's metadata JSON
            return pair
        raise BadSample("invalid_json", "JSON has no 'segments' list")
    out: list[dict[str, Any]] = []
    for i, seg in enumerate(segs):
        if not isinstance(seg, dict) or sum(k in seg for k in SEGMENT_KINDS) != 1:
            raise BadSample("invalid_json", f"segment {i} must have exactly one of {SEGMENT_KINDS}")
        if "text" in seg:
            if not isinstance(seg["text"], str):
                raise BadSample("invalid_json", f"segment {i}: text must be a string")
            try:  # JSON may escape a lone surrogate ("\ud800"), which no tokenizer takes
                seg["text"].encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadSample("invalid_text", f"segment {i}: not valid Unicode: {e}") from None
            if seg["text"]:
                out.append({"text": seg["text"]})
            continue
        kind = "image" if "image" in seg else "video"
        key = str(seg[kind]).lower()
        if key not in sample:
            raise BadSample("missing_key", f"segment {i} names {kind} {key!r}, not in the sample")
        entry = {kind: sample[key], "key": key}
        if kind == "video":
            fps = seg.get("fps")
            entry["fps"] = float(fps) if isinstance(fps, (int, float)) and fps > 0 else None
        out.append(entry)
    if not out:
        raise BadSample("empty_document", "no text and no media")
    return out


def _image_caption_pair(sample: dict[str, Any]) -> list[dict[str, Any]] | None:
    """[image, caption] of an img2dataset-style sample (one image file plus a .txt), [video,
    caption] of a video2dataset-style one (one clip plus a .txt), [text] of a lone .txt; else None."""
    images = [k for k in PAIR_IMAGE_KEYS if k in sample]
    videos = [k for k in PAIR_VIDEO_KEYS if k in sample]
    if len(images) + len(videos) > 1 or "txt" not in sample:
        return None
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("invalid_json", "the .txt caption is not UTF-8") from None
    if images:
        pair: list[dict[str, Any]] = [{"image": sample[images[0]], "key": images[0]}]
    elif videos:
        pair = [{"video": sample[videos[0]], "key": videos[0], "fps": None}]
    elif caption:
        return [{"text": caption}]
    else:
        raise BadSample("empty_document", "an empty .txt and no media")
    return pair + [{"text": caption}] if caption else pair


def tar_member_bytes(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar member with fixed metadata, so that shards are byte-identical for the same content."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    return info, io.BytesIO(data)


class ShardSink:
    """Writes samples into ``<out>/<prefix>-NNNNNN.tar`` shards of about ``max_bytes`` each
    (a shard is closed when the next sample would take it over; a larger sample gets its own)."""

    def __init__(self, out_dir: str, prefix: str = "shard", max_bytes: int = 64 << 20):
        import os

        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_bytes
        self.paths: list[str] = []
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._size = 0

    def _open(self) -> None:
        import os

        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):06d}.tar")
        self.paths.append(path)
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self._size = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        size = sum(512 + (len(b) + 511) // 512 * 512 for b in files.values())
        if self._tar is None or (self._size and self._size + size > self.max_bytes):
            self.close()
            self._open()
        for ext, data in files.items():
            self._tar.addfile(*tar_member_bytes(f"{key}.{ext}", data))
        self._size += size
        self.samples += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def spec(self) -> str:
        """The brace pattern naming all shards written, for ``data.shards``."""
        import os

        n = len(self.paths)
        if n == 0:
            return ""
        if n == 1:
            return self.paths[0]
        return os.path.join(self.out_dir, f"{self.prefix}-{{000000..{n - 1:06d}}}.tar")
