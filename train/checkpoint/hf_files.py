"""Hugging Face checkpoint directories on disk: config.json + safetensors shards (+ the index).

`HFReader` reads tensors, or slices of them, through memory-mapped `safe_open` handles and counts
the bytes it hands out (`bytes_read`), so a caller can show what a rank read. `SafetensorsWriter`
writes one safetensors file tensor by tensor: the header is computed from shapes and dtypes up
front, then each tensor's bytes are appended as it is produced, so a file never has to be in memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Small files of a released checkpoint that travel with the weights (tokenizer, processor, chat).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
              "chat_template.json", "chat_template.jinja")
# safetensors dtype codes (the format's spec).
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
HF_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_dtype(config: dict) -> Optional[torch.dtype]:
    """The dtype an HF config.json declares (`dtype` or `torch_dtype`, top level or text_config)."""
    for c in (config, config.get("text_config") or {}):
        for f in ("dtype", "torch_dtype"):
            if c.get(f) in HF_DTYPE_NAMES:
                return HF_DTYPE_NAMES[c[f]]
    return None


class HFReader:
    """Lazy view of a checkpoint directory's tensors: key -> file from the index (or the single file),
    shapes without reading data, and whole tensors or slices through memory-mapped handles."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        cfg = self.dir / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{cfg} not found: a Hugging Face checkpoint directory holds "
                                    f"config.json and *.safetensors")
        self.config = json.loads(cfg.read_text())
        if (self.dir / INDEX).exists():
            self.weight_map = dict(json.loads((self.dir / INDEX).read_text())["weight_map"])
        elif (self.dir / SINGLE).exists():
            with safe_open(self.dir / SINGLE, "pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir} has neither {INDEX} nor {SINGLE}")
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, key: str):
        if key not in self.weight_map:
            raise KeyError(f"weight {key!r} is not in {self.dir}")
        name = self.weight_map[key]
        if name not in self._handles:
            path = self.dir / name
            if not path.exists():
                raise FileNotFoundError(f"shard {path} listed in {INDEX} for {key!r} does not exist")
            self._handles[name] = safe_open(path, "pt")
        return self._handles[name]

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._handle(key).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        t = self._handle(key).get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_slice(self, key: str, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
        """key[r0[0]:r0[1], r1[0]:r1[1], ...]: only these bytes leave the memory map. Dims past
        len(ranges) are taken whole."""
        sl = self._handle(key).get_slice(key)
        t = sl[tuple(slice(a, b) for a, b in ranges)]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        """Drop the open handles: their memory maps go, and with them the mapped pages this
        process touched (which count in its RSS while mapped)."""
        self._handles.clear()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SafetensorsWriter:
    """One safetensors file written tensor by tensor, in the order of `entries` (key, shape, dtype).
    `write(key, tensor)` must be called for each entry in that order; `close()` checks all came."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.Size, torch.dtype]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.order = []
        for key, shape, dtype in entries:
            n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.order.append((key, tuple(shape), dtype, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8 bytes
        self.total = offset
        self.path = path
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, key: str, t: torch.Tensor) -> None:
        want, shape, dtype, n = self.order[self._next]
        if key != want or tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{self.path.name}: got {key} {tuple(t.shape)} {t.dtype}, expected "
                             f"{want} {shape} {dtype}")
        if n:
            self._f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            raise ValueError(f"{self.path.name}: {len(self.order) - self._next} tensor(s) not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
