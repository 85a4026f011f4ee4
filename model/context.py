"""Per-batch sequence bookkeeping passed through the decoder: document layout, rotary tables,
the context-parallel slice (when the sequence is split across ranks) and a collector for
auxiliary losses. Built once per forward, read by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from model.context_parallel import CPSlice


def segment_layout(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From cu_seqlens [N+1] over the flattened B*T tokens, return (doc_ids, pos_in_doc), both [B, T].

    Every row boundary must be a document boundary (the packer guarantees it).
    """
    total = batch * seqlen
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                      output_size=total)
    starts = cu_seqlens[:-1].repeat_interleave(lengths, output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - starts
    return doc_ids.view(batch, seqlen), pos.view(batch, seqlen)


def in_backward() -> bool:
    """True while autograd runs a backward pass. A layer's forward runs then only as activation
    checkpointing's recompute, which must leave no side effects (per-forward sums, counters).
    The graph-task id is -1 outside backward; torch.utils.checkpoint reads it the same way."""
    return torch._C._current_graph_task_id() != -1


class _Accumulators:
    """Mutable per-forward state (auxiliary losses). A plain object on purpose:
    wrappers that rebuild a module's inputs (FSDP2 copies dataclasses, dicts and lists it finds in
    them) keep the reference, so every layer adds to the same sums."""

    def __init__(self):
        self.losses: dict[str, torch.Tensor] = {}


@dataclass
class SequenceContext:
    """What the mixers need besides the hidden states.

    cu_seqlens: [N+1] int64 document boundaries over the flattened B*T tokens.
    doc_ids, pos_in_doc: [B, T]. cos, sin: [B, T, rotary_dim] fp32.
    cp: under context parallelism, this rank's slice of the token stream (model/context_parallel.py);
    then B == 1, T is the slice's length and the fields above describe the slice alone.
    key_bounds: the keys' document boundaries as ints (cu_seqlens; cp.cu_seqlens under CP), read
    to the host once per forward for every attention layer (None: each layer reads them).
    """

    cu_seqlens: torch.Tensor
    doc_ids: torch.Tensor
    pos_in_doc: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cp: Optional["CPSlice"] = None
    key_bounds: Optional[list[int]] = None
    state: _Accumulators = field(default_factory=_Accumulators)

    @property
    def aux_losses(self) -> dict[str, torch.Tensor]:
        return self.state.losses

    @property
    def batch_size(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.doc_ids.shape[1]

    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        """Adds a scalar to the sum `name`, once per forward: not again when activation
        checkpointing recomputes the layer in backward (the sum would then hold the recompute's graph)."""
        if in_backward():
            return
        self.state.losses[name] = self.state.losses.get(name, 0.0) + value

    def take_aux_losses(self) -> dict[str, torch.Tensor]:
        """The sums, removed from the context. Checkpointed layers keep the context alive from
        their saved tensors' hooks, so a sum left here whose graph backward never runs (an unused
        loss, a forward without backward) would close a cycle through autograd that Python's
        garbage collector cannot see, and leak the layers' activations every step."""
        losses, self.state.losses = self.state.losses, {}
        return losses
