"""The DCP side of HF conversion: a model state written lazily tensor by tensor, and read back one
group of tensors at a time. Used by `python -m model.hf import|export` (train/checkpoint/hf_convert.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

import torch


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


def find_run_config(ckpt: Path) -> Optional[Path]:
    """The trainer's resolved config of a run checkpoint (<run>/checkpoints/step_N -> <run>/config.yaml)."""
    for cand in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if cand.exists():
            return cand
    return None
