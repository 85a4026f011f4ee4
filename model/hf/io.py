"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors shards) and
the project's DCP checkpoints, one tensor at a time.

Memory stays bounded by the largest rule's tensors: safetensors files are memory-mapped and read
per tensor, the DCP writer pulls each tensor from a resolver when it writes it (one file per tensor,
so the writer never holds more than one), and export loads only one output shard's tensors from DCP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Small files of a released checkpoint that travel with the weights (tokenizer, processor, chat).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
              "chat_template.json", "chat_template.jinja")


class HFReader:
    """Lazy view of a checkpoint directory's tensors: key -> file from the index (or the single file),
    shapes without reading data, and one tensor at a time through memory-mapped safe_open handles."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        cfg = self.dir / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{cfg} not found: --hf-dir must be a Hugging Face checkpoint directory")
        self.config = json.loads(cfg.read_text())
        if (self.dir / INDEX).exists():
            self.weight_map = dict(json.loads((self.dir / INDEX).read_text())["weight_map"])
        elif (self.dir / SINGLE).exists():
            with safe_open(self.dir / SINGLE, "pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir} has neither {INDEX} nor {SINGLE}")
        self._handles: dict[str, object] = {}

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
        return self._handle(key).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_hf_shards(out_dir: Path, groups: list[tuple[list[str], int]],
                    produce: Callable[[list[int]], dict[str, torch.Tensor]],
                    max_shard_bytes: int) -> None:
    """Write safetensors shards plus the index. `groups`: (HF keys of one rule, their bytes), in
    order; `produce(group_indices)` returns those groups' tensors. Groups are packed into shards of at
    most max_shard_bytes (a larger group gets a shard of its own); one shard is in memory at a time."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, nbytes) in enumerate(groups):
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    weight_map, total = {}, 0
    for n, idx in enumerate(shards):
        name = SINGLE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: t.contiguous() for k, t in produce(idx).items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        if tensors or len(shards) == 1:
            save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    if len(shards) > 1:
        (out_dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


# ---- DCP ------------------------------------------------------------------------------------------

def save_dcp_lazily(path: Path, shapes: dict[str, tuple[torch.Size, torch.dtype]],
                    resolve: Callable[[str], torch.Tensor], prefix: str = "model") -> None:
    """A DCP checkpoint whose `prefix` state holds `shapes`' keys, each tensor produced by
    `resolve(key)` only when the writer reaches it (the planner is given meta placeholders)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class LazyPlanner(DefaultSavePlanner):
        def lookup_object(self, index):
            fqn = index.fqn
            key = fqn[len(prefix) + 1:]
            t = resolve(key)
            shape, dtype = shapes[key]
            if t.shape != shape:
                raise ValueError(f"{key}: produced shape {tuple(t.shape)}, expected {tuple(shape)}")
            return t.to(dtype).contiguous()

    placeholders = {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in shapes.items()}
    # One file per tensor: the writer keeps every tensor of a file until the file is done.
    writer = FileSystemWriter(str(path), single_file_per_rank=False, thread_count=1)
    _quiet_dcp(lambda: dcp.save({prefix: placeholders}, storage_writer=writer, planner=LazyPlanner()))


def dcp_model_shapes(path: Path, prefix: str = "model") -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Key -> (shape, dtype) of the `prefix` state of a DCP checkpoint (metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata()
    out = {}
    for fqn, m in meta.state_dict_metadata.items():
        if fqn.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata):
            out[fqn[len(prefix) + 1:]] = (m.size, m.properties.dtype)
    return out


def load_dcp_tensors(path: Path, keys: Iterable[str], shapes: dict, prefix: str = "model"
                     ) -> dict[str, torch.Tensor]:
    """Only `keys` of the `prefix` state, in their stored dtype."""
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty(shapes[k][0], dtype=shapes[k][1]) for k in keys}
    _quiet_dcp(lambda: dcp.load({prefix: state}, checkpoint_id=str(path)))
    return state


def _quiet_dcp(fn):
    """DCP warns on every call without a process group that it assumes a single process: true here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_run_config(ckpt: Path) -> Optional[Path]:
    """The trainer's resolved config of a run checkpoint (<run>/checkpoints/step_N -> <run>/config.yaml)."""
    for cand in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if cand.exists():
            return cand
    return None
