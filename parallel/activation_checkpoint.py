"""Activation checkpointing per decoder layer: `full` recomputes every layer in backward,
`selective` every `every`-th one (the rest keep their activations). The layer's forward is wrapped
in place (non-reentrant `torch.utils.checkpoint`), so parameter names and hooks stay as they are."""

from __future__ import annotations

import logging
from typing import Callable, ContextManager, Optional

import torch.utils.checkpoint as cp
from torch import nn

log = logging.getLogger("parallel")
ContextFn = Callable[[], tuple[ContextManager, ContextManager]]


def apply_activation_checkpoint(layers: nn.ModuleList, mode: str, every: int = 2,
                                context_fn: Optional[ContextFn] = None) -> int:
    """Returns the number of layers wrapped. `context_fn`: torch.utils.checkpoint's, called per
    checkpointed forward -> (context of that forward, context of its recompute in backward); the
    FP8 backends pass theirs (the recompute must quantise as the forward did)."""
    if mode == "none":
        return 0
    # With contexts the recompute runs to the layer's end: TE's recompute context restores a
    # module's FP8 state after the module's forward, which a recompute stopped early skips.
    extra = {} if context_fn is None else {"context_fn": context_fn, "early_stop": False}
    chosen = [layer for i, layer in enumerate(layers) if mode == "full" or (i + 1) % every == 0]
    for layer in chosen:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return cp.checkpoint(_forward, *args, use_reentrant=False, **extra, **kwargs)

        layer.forward = checkpointed
    log.info("activation checkpointing (%s): %d of %d decoder layers", mode, len(chosen), len(layers))
    return len(chosen)
