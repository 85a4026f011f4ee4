"""Activation checkpointing per decoder layer: `full` recomputes every layer in backward,
`selective` every `every`-th one (the rest keep their activations). The layer's forward is wrapped
in place (non-reentrant `torch.utils.checkpoint`), so parameter names and hooks stay as they are."""

from __future__ import annotations

import torch.utils.checkpoint as cp
from torch import nn


def apply_activation_checkpoint(layers: nn.ModuleList, mode: str, every: int = 2) -> int:
    """Returns the number of layers wrapped."""
    if mode == "none":
        return 0
    chosen = [layer for i, layer in enumerate(layers) if mode == "full" or (i + 1) % every == 0]
    for layer in chosen:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return cp.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
    return len(chosen)
