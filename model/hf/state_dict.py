"""The HF state dict of an in-memory project model (no files): for building the matching
transformers model in benchmarks and tests."""

from __future__ import annotations

from typing import Optional

import torch

from model.hf.config_map import FAMILIES, default_family, model_to_hf_config
from model.hf.weights import check_rules_cover, model_rules


def to_hf_state_dict(model, family: Optional[str] = None, fused_experts: bool = False
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, HF state dict) of an in-memory project model, e.g. to build the matching
    transformers model without files (benchmarks). fused_experts=True gives the names of
    transformers' modules (experts.gate_up_proj), False those of its checkpoints (per expert).
    Tensors may share storage with the model's."""
    cfg = model.cfg
    family = family or default_family(cfg)
    fam = FAMILIES[family]
    state = model.state_dict()
    rules = model_rules(cfg, fam, [k for k in state if k.startswith("visual.")],
                        fused_experts=lambda prefix: fused_experts)
    check_rules_cover(rules, state)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for r in rules:
            out.update(zip(r.theirs, r.to_theirs([state[k] for k in r.ours])))
    return model_to_hf_config(cfg, family, dtype="float32"), out
