"""Models for the layout equality tests the way the trainer builds them: on the meta device, then
sharded by the plans and materialised rank by rank (parallel/materialize.py), against one process
whose model is built whole from the same seed. No test relies on "the same torch seed on every
rank": the initial weights are a function of (seed, name, element index)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from model.config import ModelConfig
from model.language_model import Qwen35LM

SEED = 1234


def reference_model(cfg: ModelConfig, dtype: torch.dtype = torch.float64) -> Qwen35LM:
    """The whole model of one process, initialised from SEED."""
    with torch.device("meta"):
        model = Qwen35LM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(SEED)
    return model.to(dtype)


def meta_model(cfg: ModelConfig, dtype: torch.dtype = torch.float64) -> Qwen35LM:
    """The model on the meta device (nothing allocated), for the plans to shard."""
    with torch.device("meta"):
        return Qwen35LM(cfg).to(dtype)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def initial_state_mismatches(model: nn.Module, ref: nn.Module) -> list[str]:
    """Parameters of the sharded `model` (gathered: call on every rank of its meshes) that are not
    bit-identical to the reference's."""
    ref_params = dict(ref.named_parameters())
    return [name for name, p in model.named_parameters()
            if not torch.equal(full(p.detach()), ref_params[name].detach())]
