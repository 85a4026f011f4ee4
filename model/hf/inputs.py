"""`logits(model, **processor_outputs)`: the project's model called with what a transformers processor
returns (input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
video_grid_thw, mm_token_type_ids).

Layouts agree without conversion: `pixel_values [N, C*Tp*P*P]` flattened in the processors'
merge-block patch order is what model/vision.py reads, and the M-RoPE positions are computed from the
tokens and grids by model/mrope.py with transformers' `get_rope_index` rule (per image block
t = s, h = s + i, w = s + j; each video temporal patch its own block; text resumes at
s + max(h', w')). Padding: each row's attended span (attention_mask == 1, one contiguous span,
left or right padded) becomes its own packed document, so positions, the conv window and the
DeltaNet state start at its first real token, as in transformers; logits at padded positions are
meaningless, as there.
"""

from __future__ import annotations

from typing import Optional

import torch

ACCEPTED_EXTRAS = ("mm_token_type_ids",)  # derived from input_ids here; accepted so **inputs works


def cu_seqlens_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] (1 = token, 0 = padding; one contiguous span of 1s per row)
    -> cu_seqlens [N+1] over the flattened B*T positions: the span and each padding run are documents."""
    b, t = attention_mask.shape
    bounds = {0}
    for row, m in enumerate(attention_mask.bool().tolist()):
        idx = [i for i, v in enumerate(m) if v]
        if idx and idx[-1] - idx[0] + 1 != len(idx):
            raise ValueError(f"attention_mask row {row} has padding inside the sequence; only left or "
                             f"right padding is supported")
        cuts = [0, t] + ([idx[0], idx[-1] + 1] if idx else [])
        bounds.update(row * t + c for c in cuts)
    return torch.tensor(sorted(bounds), dtype=torch.long, device=attention_mask.device)


def logits(model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
           image_grid_thw: Optional[torch.Tensor] = None,
           pixel_values_videos: Optional[torch.Tensor] = None,
           video_grid_thw: Optional[torch.Tensor] = None,
           attention_mask: Optional[torch.Tensor] = None, **extras) -> torch.Tensor:
    """input_ids [B, T] (+ the processor's vision tensors) -> logits [B, T, vocab].

    Gradients flow as usual; wrap the call in torch.no_grad() for inference.
    """
    unknown = sorted(set(extras) - set(ACCEPTED_EXTRAS))
    if unknown:
        raise TypeError(f"logits() got unexpected inputs {unknown}; accepted: input_ids, "
                        f"attention_mask, pixel_values, image_grid_thw, pixel_values_videos, "
                        f"video_grid_thw, {', '.join(ACCEPTED_EXTRAS)}")
    cu_seqlens = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        cu_seqlens = cu_seqlens_from_attention_mask(attention_mask)
    out = model(input_ids, cu_seqlens=cu_seqlens, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw)
    return out.logits
