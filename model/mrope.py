"""M-RoPE positions (t, h, w) for sequences of text, image and video tokens: the one function the
model, the data pipeline and generation code all call.

The released rule (transformers' Qwen3.5 `get_rope_index`), per document:
- text: t = h = w = a running index;
- a visual block (the merged tokens of one image, or of one temporal patch of a video) starting
  where the running index is s, on a merged grid of t' x h' x w': t = s + k, h = s + i, w = s + j
  for temporal index k, merged row i and column j (k = 0 in practice: images have t' = 1 and every
  video temporal patch is its own block, separated by its timestamp text);
- the text after a block continues at the block's maximum + 1 (s + max(t', h', w')).
Every document of a packed row restarts at 0 (documents given by cu_seqlens).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from model.context import segment_layout


def _blocks(grid_thw: Optional[torch.Tensor], merge: int, split_temporal: bool) -> list[tuple[int, int, int]]:
    """Merged grids (t', h', w') of the visual blocks, in order; videos split per temporal patch."""
    if grid_thw is None:
        return []
    out = []
    for t, h, w in grid_thw.tolist():
        if split_temporal:
            out += [(1, h // merge, w // merge)] * t
        else:
            out.append((t, h // merge, w // merge))
    return out


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                       video_grid_thw: Optional[torch.Tensor] = None,
                       cu_seqlens: Optional[torch.Tensor] = None, *, image_token_id: int,
                       video_token_id: int, spatial_merge_size: int = 2) -> torch.Tensor:
    """input_ids [B, T] (+ grids [Ni, 3] / [Nv, 3] in order of appearance over the flattened batch,
    cu_seqlens [N+1] document boundaries over the flattened B*T tokens; default one per row)
    -> position_ids [3, B, T] long (rows t, h, w).

    A block's pads must be contiguous and inside one document; a count that does not add up
    raises ValueError naming the batch row.
    """
    b, t = input_ids.shape
    device = input_ids.device
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (b + 1) * t, t, device=device)
    doc_ids, pos_in_doc = segment_layout(cu_seqlens, b, t)
    ids = input_ids.flatten()
    doc = doc_ids.flatten()
    base = pos_in_doc.flatten().clone()   # becomes the running text index
    pos = base.unsqueeze(0).repeat(3, 1)  # [3, B*T]
    delta = torch.zeros_like(base)        # position jump where a block ends

    blocks = []  # (first token, length, (t', h', w'))
    for token_id, grids, split in ((image_token_id, image_grid_thw, False),
                                   (video_token_id, video_grid_thw, True)):
        where = (ids == token_id).nonzero().flatten().tolist()
        shapes = _blocks(grids, spatial_merge_size, split)
        i = 0
        for shape in shapes:
            n = shape[0] * shape[1] * shape[2]
            span = where[i:i + n]
            if len(span) < n or span[-1] - span[0] != n - 1 or doc[span[0]] != doc[span[-1]]:
                row = (span[0] if span else (where[-1] if where else 0)) // t
                raise ValueError(
                    f"M-RoPE: batch row {row}: a visual block of merged grid {shape} needs {n} "
                    f"contiguous pad tokens (id {token_id}) inside one document; found "
                    f"{len(span)}{'' if len(span) < n else ' not contiguous or crossing a document'}")
            blocks.append((span[0], n, shape))
            i += n
        if i != len(where):
            raise ValueError(f"M-RoPE: batch row {where[i] // t}: {len(where) - i} pad tokens "
                             f"(id {token_id}) beyond the {len(shapes)} visual blocks of the grids")

    # Each block shortens what follows it by (tokens - extent): the next text starts at s + extent.
    for start, n, (bt, bh, bw) in blocks:
        end = start + n
        if end < ids.numel() and doc[end] == doc[start]:
            delta[end] += max(bt, bh, bw) - n
    cum = delta.cumsum(0)
    doc_start = cu_seqlens[doc]
    running = base + cum - F.pad(cum, (1, 0))[doc_start]   # restart the shifts per document
    pos[:] = running

    for start, n, (bt, bh, bw) in blocks:
        s = running[start]
        tt, hh, ww = torch.meshgrid(torch.arange(bt, device=device), torch.arange(bh, device=device),
                                    torch.arange(bw, device=device), indexing="ij")
        pos[:, start:start + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + s
    return pos.view(3, b, t)
