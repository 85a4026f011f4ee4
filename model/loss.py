"""Per-token cross-entropy: the model's loss seam.

The model computes every CE (main, per-modality, MTP) through one `TokenCrossEntropy` module, so
that a tensor-parallel plan can replace it with a vocab-parallel one that takes the local vocabulary
shard of the logits and never gathers the full logits (parallel/tensor_parallel.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.norm import at_least_fp32

IGNORE_INDEX = -100


class TokenCrossEntropy(nn.Module):
    """logits [B, T, V], labels [B, T] (IGNORE_INDEX = no loss) -> CE per token [B, T] in at least
    fp32, 0 where ignored."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(logits).flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)
