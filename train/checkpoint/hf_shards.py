"""`train.init_from_hf=DIR`: fill a parallelised model's local shards straight from a Hugging Face
directory, each rank reading only the slices its shards need.

For every parameter, the rank's region of the global tensor comes from its DTensor placements
(`parallel.materialize.local_index`: the same rule that initialises shards), and model/hf's rules
say which HF tensors, and which rows of them, make up that global tensor (`weights.Part`: a fused
`in_proj_qkv` / `conv1d` row range, a per-head row block of Qwen3-Next's `in_proj_qkvz`, one expert
of a per-expert layout, or the whole tensor). The overlap of the two is read with safetensors'
`get_slice` from the memory-mapped file, in contiguous runs, and copied into the local shard.
Host memory: the rank's own shards plus one slice at a time (at most one of its shards' pieces)
and the mapped pages of one parameter's HF tensors, whatever the model size. `HFReader.bytes_read` counts what was read.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from model.config import ModelConfig
from model.hf.weights import Part
from model.init import canonical_name
from parallel.materialize import local_index
from train.checkpoint.hf_convert import ConversionError, ImportPlan
from train.checkpoint.hf_files import HFReader

log = logging.getLogger("train.checkpoint")


def _runs(pos: torch.Tensor, src: torch.Tensor) -> list[tuple[int, int, int]]:
    """(local start, source start, length) of the maximal runs where both index vectors step by 1."""
    if len(pos) == 0:
        return []
    cut = (torch.nonzero((pos[1:] - pos[:-1] != 1) | (src[1:] - src[:-1] != 1)).flatten() + 1).tolist()
    starts, ends = [0] + cut, cut + [len(pos)]
    return [(int(pos[a]), int(src[a]), b - a) for a, b in zip(starts, ends)]


def fill_part(local: torch.Tensor, idx: list[torch.Tensor], shape: torch.Size, part: Part,
              reader: HFReader) -> None:
    """Copy into `local` (this rank's piece of a global tensor of `shape`, holding the global
    indices `idx` per dim) what it holds of `part`, reading only those HF slices."""
    if len(shape) == 0:
        local.copy_(reader.get(part.key))
        return
    prefix = []
    for j, e in enumerate(part.lead):
        hit = torch.nonzero(idx[j] == e).flatten()
        if len(hit) == 0:
            return
        prefix.append(int(hit[0]))
    r = len(part.lead)
    lo, hi = part.rows or (0, shape[r])
    sel = torch.nonzero((idx[r] >= lo) & (idx[r] < hi)).flatten()
    if len(sel) == 0:
        return
    runs = [_runs(sel, idx[r][sel] - lo + part.hf_row0)]
    runs += [_runs(torch.arange(len(idx[d])), idx[d]) for d in range(r + 1, len(shape))]
    for combo in itertools.product(*runs):
        piece = reader.read_slice(part.key, [(s, s + n) for _, s, n in combo])
        local[tuple(prefix) + tuple(slice(p, p + n) for p, _, n in combo)].copy_(piece)


@torch.no_grad()
def load_hf_shards(model: nn.Module, hf_dir: Union[str, Path], cfg: ModelConfig) -> dict[str, int]:
    """Fill every parameter (and the state-dict buffers the rules know, e.g. the router bias: zeros)
    of `model` (materialised, possibly sharded by the plans) from `hf_dir`. The directory is checked
    first: a weight the model needs that it lacks, a shape that disagrees, or a weight with no place
    in the model raises ConversionError naming it. Returns this rank's {"bytes_read": bytes of the
    slices read, "local_bytes": bytes of the local shards filled from them}."""
    plan = ImportPlan(hf_dir, cfg=cfg)
    reader = plan.reader
    parts = {k: ps for r in plan.rules for k, ps in r.parts.items()}
    shapes = plan.our_shapes
    local_bytes = 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        key = canonical_name(name)
        if key not in parts:
            if isinstance(t, nn.Parameter):
                raise ConversionError(f"parameter {key} has no Hugging Face source (model/hf/weights.py)")
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        idx = local_index(t, "cpu")
        if idx is None:
            continue
        if not parts[key]:  # no HF counterpart (the router's selection bias): zeros, as on import
            local.zero_()
            continue
        local_bytes += local.numel() * local.element_size()
        for part in parts[key]:
            fill_part(local, idx, shapes[key], part, reader)
        # Unmap after each parameter: pages touched through the maps count in the RSS while
        # mapped, so holding every file open would add up to this rank's share of the files.
        reader.close()
    return {"bytes_read": reader.bytes_read, "local_bytes": local_bytes}
