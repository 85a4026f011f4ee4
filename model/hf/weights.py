"""Weight-name and layout mapping between the project's state dict and the released HF checkpoints.

One `Rule` ties a few project tensors to a few HF tensors with a function each way. Most rules are
renames; the others:
- Qwen3-Next's fused `in_proj_qkvz` / `in_proj_ba`, grouped per key head as [q, k, v(r), z(r)] and
  [b(r), a(r)] (r = value heads per key head), become the separate `in_proj_{q,k,v,z,b,a}`
  (transformers' `fix_query_key_value_ordering`); Qwen3.5's `in_proj_qkv` and both families'
  depthwise `conv1d` ([q | k | v] channels) split into `in_proj_{q,k,v}` and `conv_{q,k,v}`;
- per-expert `experts.{e}.{gate,up,down}_proj.weight` (how released checkpoints and transformers'
  `save_pretrained` store them) become the fused `gate_up_proj [E, 2I, D]` ([gate | up] on dim 1)
  and `down_proj [E, D, I]`; a checkpoint holding the fused tensors maps one to one;
- the router's `expert_bias` (auxiliary-loss-free balancing) has no HF counterpart: zeros on import,
  and export refuses a non-zero one (transformers' router cannot apply it);
- tied embeddings: one HF tensor fills `embed_tokens.weight` and `lm_head.weight`.
Norms need no conversion: the decoder, q/k and MTP RMSNorms are zero-centred `(1 + w)` on both sides
(Qwen3_5RMSNorm, Qwen3NextRMSNorm), the GDN gated norm a plain `w` on both sides, and the ViT
LayerNorms are plain nn.LayerNorm on both sides.
MTP (`mtp.*`, dropped by transformers, read by vLLM): one MTP depth maps `mtp.0.{pre_fc_norm_embedding,
pre_fc_norm_hidden, fc, norm}` <-> `mtp.{...}` and `mtp.0.layer.*` <-> `mtp.layers.0.*` (vLLM's
Qwen3-Next MTP module); deeper project MTP stacks have one fc/norm set per depth and no HF layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from model.config import FULL_ATTENTION, ConfigError, ModelConfig
from model.hf.config_map import Family

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Part:
    """Where a region of a project tensor lives in the HF checkpoint: the project tensor's
    [*lead, rows[0]:rows[1], ...] is HF tensor `key`'s [hf_row0 : hf_row0 + rows[1] - rows[0], ...]
    (the trailing dims map one to one). rows=None: the whole dim. `lead` indexes leading project
    dims the HF tensor does not have (the expert of a per-expert tensor). A rank reading its shard
    of the project tensor reads only the HF slices its region overlaps (train/checkpoint/hf_shards.py)."""
    key: str
    rows: Optional[tuple[int, int]] = None
    hf_row0: int = 0
    lead: tuple[int, ...] = ()


@dataclass
class Rule:
    ours: list[str]                               # project state-dict keys
    theirs: list[str]                             # HF state-dict keys
    to_ours: Callable[[Tensors], Tensors]
    to_theirs: Callable[[Tensors], Tensors]
    # project key -> the HF regions that make it up, in any order (empty list: no HF source, zeros)
    parts: dict[str, list[Part]] = field(default_factory=dict)


def _same(ts: Tensors) -> Tensors:
    return list(ts)


def rename(ours: str, theirs: str) -> Rule:
    return Rule([ours], [theirs], _same, _same, {ours: [Part(theirs)]})


# ---- Qwen3-Next fused GDN projections -----------------------------------------------------------

def next_gdn_rule(ours: str, theirs: str, cfg: ModelConfig) -> Rule:
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, hv // hk

    def to_ours(ts: Tensors) -> Tensors:
        qkvz, ba = ts  # [hk*(2dk + 2r*dv), D], [hk*2r, D]
        d = qkvz.shape[-1]
        q, k, v, z = qkvz.view(hk, 2 * dk + 2 * r * dv, d).split([dk, dk, r * dv, r * dv], dim=1)
        b, a = ba.view(hk, 2 * r, d).split([r, r], dim=1)
        return [q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d), z.reshape(-1, d),
                b.reshape(-1, d), a.reshape(-1, d)]

    def to_theirs(ts: Tensors) -> Tensors:
        q, k, v, z, b, a = ts
        d = q.shape[-1]
        qkvz = torch.cat([q.view(hk, dk, d), k.view(hk, dk, d), v.view(hk, r * dv, d),
                          z.view(hk, r * dv, d)], dim=1).reshape(-1, d)
        ba = torch.cat([b.view(hk, r, d), a.view(hk, r, d)], dim=1).reshape(-1, d)
        return [qkvz, ba]

    # Per key head h: rows of q, k, v, z at offsets 0, dk, 2dk, 2dk + r*dv of its qkvz group; b, a
    # at 0, r of its ba group.
    group = {"q": (dk, 0), "k": (dk, dk), "v": (r * dv, 2 * dk), "z": (r * dv, 2 * dk + r * dv)}
    parts = {f"{ours}in_proj_{n}.weight": [
        Part(f"{theirs}in_proj_qkvz.weight", (h * size, (h + 1) * size), h * (2 * dk + 2 * r * dv) + off)
        for h in range(hk)] for n, (size, off) in group.items()}
    parts.update({f"{ours}in_proj_{n}.weight": [
        Part(f"{theirs}in_proj_ba.weight", (h * r, (h + 1) * r), h * 2 * r + off) for h in range(hk)]
        for n, off in (("b", 0), ("a", r))})
    return Rule([f"{ours}in_proj_{n}.weight" for n in "qkvzba"],
                [f"{theirs}in_proj_qkvz.weight", f"{theirs}in_proj_ba.weight"], to_ours, to_theirs, parts)


def split_qkv_rule(ours: str, theirs: str, cfg: ModelConfig, kind: str) -> Rule:
    """Qwen3.5's fused `in_proj_qkv` [q | k | v] (kind 'proj') or `conv1d` (kind 'conv') <-> the
    project's separate q, k, v tensors."""
    sizes = [cfg.linear_num_key_heads * cfg.linear_key_head_dim] * 2 + \
        [cfg.linear_num_value_heads * cfg.linear_value_head_dim]
    names = ([f"{ours}in_proj_{n}.weight" for n in "qkv"] if kind == "proj"
             else [f"{ours}conv_{n}.weight" for n in "qkv"])
    theirs_key = f"{theirs}in_proj_qkv.weight" if kind == "proj" else f"{theirs}conv1d.weight"
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    parts = {n: [Part(theirs_key, (0, size), start)] for n, size, start in zip(names, sizes, starts)}
    return Rule(names, [theirs_key], lambda ts: list(ts[0].split(sizes)), lambda ts: [torch.cat(ts)],
                parts)


# ---- experts -------------------------------------------------------------------------------------

def per_expert_rules(ours: str, theirs: str, num_experts: int, inter: int) -> list[Rule]:
    """`inter`: an expert's intermediate size I (gate and up each have I rows)."""
    gate = [f"{theirs}experts.{e}.gate_proj.weight" for e in range(num_experts)]
    up = [f"{theirs}experts.{e}.up_proj.weight" for e in range(num_experts)]
    down = [f"{theirs}experts.{e}.down_proj.weight" for e in range(num_experts)]
    n = num_experts

    def gate_up_to_ours(ts: Tensors) -> Tensors:
        return [torch.stack([torch.cat([g, u]) for g, u in zip(ts[:n], ts[n:])])]

    def gate_up_to_theirs(ts: Tensors) -> Tensors:
        g, u = ts[0].chunk(2, dim=1)
        return list(g.unbind(0)) + list(u.unbind(0))

    gate_up_parts = [Part(k, (i * inter, (i + 1) * inter), 0, (e,))
                     for i, keys in enumerate((gate, up)) for e, k in enumerate(keys)]
    return [Rule([f"{ours}experts.gate_up_proj"], gate + up, gate_up_to_ours, gate_up_to_theirs,
                 {f"{ours}experts.gate_up_proj": gate_up_parts}),
            Rule([f"{ours}experts.down_proj"], down, lambda ts: [torch.stack(ts)],
                 lambda ts: list(ts[0].unbind(0)),
                 {f"{ours}experts.down_proj": [Part(k, None, 0, (e,)) for e, k in enumerate(down)]})]


def expert_bias_rule(key: str, num_experts: int) -> Rule:
    def to_theirs(ts: Tensors) -> Tensors:
        if ts[0].device.type != "meta" and bool((ts[0] != 0).any()):
            raise ValueError(f"{key} is non-zero (auxiliary-loss-free balancing, "
                             f"model.router_bias_balancing): transformers' router has no selection "
                             f"bias, so the exported model would route differently")
        return []

    return Rule([key], [], lambda ts: [torch.zeros(num_experts)], to_theirs, {key: []})


# ---- layers --------------------------------------------------------------------------------------

def layer_rules(cfg: ModelConfig, fam: Family, ours: str, theirs: str, layer_type: str, moe: bool,
                fused_experts: Callable[[str], bool]) -> list[Rule]:
    """Rules of one decoder layer. `fused_experts(hf_mlp_prefix)` says whether the HF side stores
    `experts.gate_up_proj` (True) or per-expert tensors (False)."""
    rules = [rename(f"{ours}{n}.weight", f"{theirs}{n}.weight")
             for n in ("input_layernorm", "post_attention_layernorm")]
    if layer_type == FULL_ATTENTION:
        rules += [rename(f"{ours}self_attn.{n}.weight", f"{theirs}self_attn.{n}.weight")
                  for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
    else:
        o, t = f"{ours}linear_attn.", f"{theirs}linear_attn."
        rules += [rename(f"{o}{n}", f"{t}{n}")
                  for n in ("A_log", "dt_bias", "norm.weight", "out_proj.weight")]
        rules.append(split_qkv_rule(o, t, cfg, "conv"))
        if fam.fused_gdn:
            rules.append(next_gdn_rule(o, t, cfg))
        else:
            rules.append(split_qkv_rule(o, t, cfg, "proj"))
            rules += [rename(f"{o}{n}.weight", f"{t}{n}.weight")
                      for n in ("in_proj_z", "in_proj_b", "in_proj_a")]
    o, t = f"{ours}mlp.", f"{theirs}mlp."
    if not moe:
        return rules + [rename(f"{o}{n}.weight", f"{t}{n}.weight")
                        for n in ("gate_proj", "up_proj", "down_proj")]
    rules += [rename(f"{o}gate.weight", f"{t}gate.weight"),
              expert_bias_rule(f"{o}gate.expert_bias", cfg.num_experts)]
    if fused_experts(t):
        rules += [rename(f"{o}experts.{n}", f"{t}experts.{n}") for n in ("gate_up_proj", "down_proj")]
    else:
        rules += per_expert_rules(o, t, cfg.num_experts, cfg.moe_intermediate_size)
    if cfg.shared_expert_intermediate_size > 0:
        rules += [rename(f"{o}shared_expert.{n}.weight", f"{t}shared_expert.{n}.weight")
                  for n in ("gate_proj", "up_proj", "down_proj")]
        rules.append(rename(f"{o}shared_expert_gate.weight", f"{t}shared_expert_gate.weight"))
    return rules


def model_rules(cfg: ModelConfig, fam: Family, vision_keys: Iterable[str] = (),
                fused_experts: Callable[[str], bool] = lambda prefix: False) -> list[Rule]:
    """Every rule of the model, in the project's state-dict order. `vision_keys`: the project's
    `visual.*` keys (the ViT's names are the released ones, so they are renames)."""
    p = fam.text_prefix
    types = cfg.resolved_layer_types()
    if cfg.tie_word_embeddings:
        tied = [Part(f"{p}embed_tokens.weight")]
        rules = [Rule(["embed_tokens.weight", "lm_head.weight"], [f"{p}embed_tokens.weight"],
                      lambda ts: [ts[0], ts[0]], lambda ts: [ts[0]],
                      {"embed_tokens.weight": tied, "lm_head.weight": tied})]
    else:
        rules = [rename("embed_tokens.weight", f"{p}embed_tokens.weight"),
                 rename("lm_head.weight", "lm_head.weight")]
    for i in range(cfg.num_layers):
        rules += layer_rules(cfg, fam, f"layers.{i}.", f"{p}layers.{i}.", types[i], cfg.layer_is_moe(i),
                             fused_experts)
    rules.append(rename("norm.weight", f"{p}norm.weight"))
    if cfg.mtp_num_layers > 1:
        raise ConfigError(f"model.mtp_num_layers={cfg.mtp_num_layers}: only a single MTP depth has a "
                          f"Hugging Face / vLLM layout (mtp.fc, mtp.layers.0); use 0 or 1")
    if cfg.mtp_num_layers == 1:
        rules += [rename(f"mtp.0.{n}.weight", f"mtp.{n}.weight")
                  for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")]
        rules += layer_rules(cfg, fam, "mtp.0.layer.", "mtp.layers.0.", FULL_ATTENTION,
                             cfg.mlp_type == "moe", fused_experts)
    for k in vision_keys:
        rules.append(rename(k, f"model.{k}"))
    return rules


def check_rules_cover(rules: list[Rule], our_keys: Iterable[str]) -> None:
    """Every project key is produced by exactly one rule (a guard on this module, not on user input)."""
    produced: dict[str, int] = {}
    for r in rules:
        for k in r.ours:
            produced[k] = produced.get(k, 0) + 1
    ours = set(our_keys)
    missing = sorted(ours - set(produced))
    extra = sorted(set(produced) - ours)
    dup = sorted(k for k, n in produced.items() if n > 1)
    if missing or extra or dup:
        raise AssertionError(f"weight rules out of sync with the model: unmapped {missing[:5]}, "
                             f"unknown {extra[:5]}, duplicated {dup[:5]}")


def expected_hf_shapes(rules: list[Rule], our_shapes: dict[str, torch.Size],
                       dtype: Optional[torch.dtype] = None) -> dict[str, torch.Size]:
    """HF key -> shape, computed by pushing meta tensors of the project's shapes through the rules."""
    out = {}
    for r in rules:
        metas = [torch.empty(our_shapes[k], device="meta", dtype=dtype or torch.float32) for k in r.ours]
        for k, t in zip(r.theirs, r.to_theirs(metas)):
            out[k] = t.shape
    return out
