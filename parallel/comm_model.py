"""What a training step's collectives move, predicted from the config: the analytic twin of
parallel/comm_count.py, keyed the same way ((kind, group label) -> calls, payload, bytes sent) and
using the same byte definitions (`comm_count.sent_bytes`).

    table = predict_table(model_cfg, layout, StepSpec(rows=1, seq_len=8192, param_bytes=2))

It walks the model's parameters (built on the meta device, so any size costs nothing) and the plans
of parallel/ as they are applied by `parallel.plan.parallelize`, for one micro-batch per step
(grad_accum 1) and the step of train/trainer.py:

- FSDP2 (`parallel/fsdp.py`), per unit (the ViT, each decoder layer, each MTP block, under EP each
  MoE layer's routed experts over the expert_dp group, and the root: embedding, final norm, LM
  head): an all-gather of the unit's padded shards in forward (param dtype), again in backward for
  every unit but the root (reshard_after_forward), a reduce-scatter of the gradients (reduce
  dtype), and under HSDP an all-reduce of the reduced shard over dp_replicate. Shards are
  `ceil(dim0 / n)` rows of each parameter's (TP/EP-local) tensor, as FSDP2 pads them. Units on a
  group of one rank move nothing.
- TP + SP (`parallel/tensor_parallel.py`), per decoder layer, A = rows x seq_len x hidden
  activations: forward all-gather A (mixer input), reduce-scatter A (output projection),
  all-gather A (MLP input; a dense MLP also reduce-scatters its output); backward the twins
  (all-gather for each forward reduce-scatter and for the MoE's output chunk, reduce-scatter for
  the mixer's and a dense MLP's input); the first layer's input all-gather in backward, the last
  layer's output all-gather in forward; the gradient all-reduces of the weights shared by all heads
  (q/k norm, the gated norm) and of the two sequence-parallel norms. Per embedding / LM-head use
  (the main one, then each MTP depth): the embedding's output all-reduce (forward), the LM head's
  input-gradient all-reduce (backward), and the vocab-parallel cross-entropy's three fp32 [B, T]
  all-reduces.
- EP (`parallel/expert_parallel.py`), per MoE call (decoder layers and MTP layers), N = rows x
  seq_len tokens (under TP every tp rank routes the whole gathered sequence): the [E] int64 count
  exchange, then four row all-to-alls (dispatch and combine, forward and backward) of N x top_k
  rows of hidden size. Which rows leave the rank depends on the routing: by default the
  expectation under uniform routing ((ep-1)/ep of the rows to other ranks, each rank receiving as
  many as it sends); pass `EPTraffic` (what the dispatchers counted) for the exact bytes.
- the vision plan (`parallel/vision_plan.py`), balanced over tp: one all-gather of the merged
  embeddings per forward (tp x the largest share's rows, as `assign_items` splits the images) and
  the ViT gradients' all-reduce over tp in 64 MiB buckets (this rank's FSDP shards under FSDP).
- CP (`model/context_parallel.py`, `parallel/context_parallel.py`), every rank holding N/cp of the
  micro-batch's tokens (which is also what TP, EP and the CE above move per rank): per attention
  layer (decoder and MTP) one all-gather of the slice's stacked K and V (cp x N/cp x 2 x the local
  KV heads x head_dim), per Gated DeltaNet layer two all-gathers of sizes independent of N (the
  conv halo, cp x (kernel-1) x the local q/k/v channels; the [S0 | M] summaries, cp x local value
  heads x K x (V + K) in at least fp32), each with an all-reduce of the same bytes in backward (the
  gathers' backward); per MoE call the [E] expert counts (all-reduce, at least fp32); per
  micro-batch the loss counts (int64) and the reported loss values (one all-reduce each); the
  trainer's expert load summed over cp. Activation checkpointing repeats a layer's forward gathers.
- the trainer: the token total, the logged loss sums, the per-modality sums, the expert load
  (float64 all-reduces over the data-parallel ranks) and the gradient norms (one float64 scalar
  all-reduce per mesh dimension of each kind of gradient sharding: FSDP, FSDP x TP sharded,
  FSDP x TP replicated, expert FSDP x EP; once for the ViT's norm and once for clipping).

Activation checkpointing: a recomputed decoder layer repeats its forward's TP collectives (not the
stack's first/last-layer hooks, which sit outside the checkpointed forward) and its EP count and row
exchanges; FSDP gathers nothing more (the unit is already gathered for its backward).

Approximations (exact otherwise; tests/test_comm_accounting.py and benchmarks/bench_parallel.py
check counted == analytic on the CPU layouts): EP rows under uniform routing unless measured
(dropless: a capacity factor sends fewer); activations in the FSDP param dtype (the CE's exchanges
stay fp32); group labels follow `mesh_group_labels` on the assumption that only a dimension
spanning the whole world shares its process group with another (the default group). Not modelled:
gradient accumulation (FSDP collectives per micro-batch, trainer scalars per step) and pp.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import torch

from model.config import FULL_ATTENTION, ModelConfig
from parallel.comm_count import PRIMARY_ROLES, CommStat, CommTable, sent_bytes
from parallel.layout import Layout

# comm_count's role names -> parallel.layout.GROUP_AXES kinds (Layout.group gives the ranks)
ROLE_GROUPS = {"dp_shard": "fsdp", "dp_replicate": "dp_replicate", "tp": "tp", "ep": "ep",
               "expert_dp": "expert_fsdp", "dp": "loss", "vision": "vision", "cp": "cp"}
VISION_BUCKET_BYTES = 64 << 20   # reduce_vision_grads' default bucket
SCALAR_BYTES = 8                 # float64: sum_over and the grad-norm partial sums


@dataclass(frozen=True)
class StepSpec:
    """One step of one data-parallel rank: rows x seq_len tokens (grad_accum 1)."""

    rows: int
    seq_len: int
    image_patches: tuple[int, ...] = ()   # t*h*w of each image / video of this rank's micro-batch
    param_bytes: int = 4        # FSDP2 param dtype: all-gathers and activations (bf16: 2)
    reduce_bytes: int = 4       # FSDP2 reduce dtype: reduce-scatter, HSDP all-reduce
    master_bytes: int = 4       # sharded parameters and their gradients (fp32 master weights)
    vision_plan: str = "balanced"
    reshard_after_forward: bool = True
    activation_checkpoint: str = "none"   # none | full | selective (parallel.activation_checkpoint)
    selective_ac_every: int = 2
    trainer: bool = True        # the trainer's scalar reductions (token total, losses, norms, load)
    rank: int = 0               # whose FSDP shards (uneven when dim 0 does not divide) to count

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    def local_tokens(self, cp: int) -> int:
        """Tokens of this rank's slice of the micro-batch under context parallelism."""
        return self.tokens // cp

    def recomputed(self, layer: int) -> bool:
        """Whether decoder layer `layer` runs its forward again in backward (as
        parallel/activation_checkpoint.py chooses; MTP blocks are never checkpointed)."""
        if self.activation_checkpoint == "full":
            return True
        return self.activation_checkpoint == "selective" and (layer + 1) % self.selective_ac_every == 0


@dataclass(frozen=True)
class EPTraffic:
    """Measured EP row traffic of one step on this rank, summed over MoE calls, forward and
    backward (`parallel.expert_parallel.collect_comm_bytes`): bytes of rows sent to other ranks
    (`tokens_sent`) and rows whose source is this rank's own experts (`tokens_local`)."""

    sent_bytes: int
    local_bytes: int


@dataclass
class Collective:
    source: str        # fsdp | tp | ep | vision | cp | trainer
    kind: str          # comm_count.KINDS
    group: str         # label, as comm_count.mesh_group_labels names it
    n: int             # group size
    payload: int       # bytes per call (comm_count's definition)
    calls: int = 1
    sent: Optional[Fraction] = None   # all calls; None: comm_count.sent_bytes(kind, payload, n) each
    payload_all: Optional[int] = None  # all calls, when they differ; None: calls x payload
    role: str = ""     # the mesh dimension: a key of parallel.layout.GROUP_AXES (fsdp, tp, ...)

    def payload_total(self) -> int:
        return self.payload_all if self.payload_all is not None else self.calls * self.payload

    def sent_total(self) -> Fraction:
        if self.sent is not None:
            return self.sent
        return self.calls * sent_bytes(self.kind, self.payload, self.n)


@dataclass
class Groups:
    """Group sizes and labels of a layout, as parallel/mesh.py builds them (pp = 1)."""

    layout: Layout
    sizes: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, L: Layout) -> "Groups":
        sizes = {"dp_shard": L.dp_shard * L.cp, "dp_replicate": L.dp_replicate, "tp": L.tp,
                 "ep": L.ep, "expert_dp": L.dp_shard_mod_ep if L.ep > 1 else 1, "dp": L.dp,
                 "vision": L.tp, "cp": L.cp}
        g = cls(L, sizes)
        # A dimension spanning the world is the default group: those share one label.
        world_roles = [r for r in PRIMARY_ROLES if sizes[r] == L.world and L.world > 1]
        for r in PRIMARY_ROLES:
            g.labels[r] = "+".join(world_roles) if r in world_roles else r
        # The loss group is FSDP's shard group unless HSDP or CP make it a group of its own.
        g.labels["dp"] = g.labels["dp_shard"] if L.dp_replicate == 1 and L.cp == 1 else "dp"
        g.labels["vision"] = g.labels["tp"]
        g.labels["cp"] = "+".join(world_roles) if L.cp == L.world and world_roles else "cp"
        return g

    def coll(self, source: str, kind: str, role: str, payload: int, calls: int = 1) -> Collective:
        return Collective(source, kind, self.labels[role], self.sizes[role], payload, calls,
                          role=ROLE_GROUPS[role])


# ---- parameters, as the plans leave them -------------------------------------------------------

def meta_model(cfg: ModelConfig):
    from model.language_model import Qwen35LM

    with torch.device("meta"):
        return Qwen35LM(cfg)


@dataclass
class Param:
    name: str
    shape: tuple[int, ...]       # local: after TP / EP sharding
    unit: str                    # FSDP unit: visual | layers.i | layers.i.mlp.experts | mtp.j | root
    tp: Optional[str] = None     # TP placement (None: plain)
    expert: bool = False


def local_params(cfg: ModelConfig, L: Layout) -> list[Param]:
    """Every trainable parameter with its TP/EP-local shape and FSDP unit (the innermost enclosing
    unit of parallel/spec.py, `root` outside every unit), as parallel/plan.py applies the spec."""
    from parallel.fsdp import fsdp_units
    from parallel.spec import ep_role, tp_placements

    model = meta_model(cfg)
    placements = tp_placements(model, L.tp, cfg.num_key_value_heads) if L.tp > 1 else {}
    experts = [name for name, m in model.named_modules() if ep_role(name, m)]
    units = sorted((name for name, _, _ in fsdp_units(model, experts_apart=L.ep > 1)),
                   key=len, reverse=True)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = list(p.shape)
        tp = placements.get(name)
        if tp == "shard0":
            shape[0] //= L.tp
        elif tp == "shard1":
            shape[1] //= L.tp
        expert = any(name.startswith(e + ".") for e in experts)
        if expert and L.ep > 1:
            shape[0] //= L.ep
        unit = next((u for u in units if name.startswith(u + ".")), "root")
        out.append(Param(name, tuple(shape), unit, tp, expert))
    return out


def _chunk_rows(d0: int, n: int, rank: int) -> tuple[int, int]:
    """(padded rows per shard, this rank's real rows) of torch.chunk(dim0, n), as FSDP2 shards."""
    c = math.ceil(d0 / n) if d0 else 0
    return c, max(0, min(c, d0 - rank * c))


def _rest(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


# ---- the plans' collectives --------------------------------------------------------------------

def fsdp_collectives(params: list[Param], L: Layout, g: Groups, spec: StepSpec) -> list[Collective]:
    if L.dp_shard * L.cp * L.dp_replicate == 1:
        return []                                  # parallelize() skips FSDP
    units: dict[str, list[Param]] = defaultdict(list)
    for p in params:
        units[p.unit].append(p)
    out = []
    for unit, ps in units.items():
        shard_role = "expert_dp" if unit.endswith(".experts") else "dp_shard"
        n = g.sizes[shard_role]
        shard = sum(_chunk_rows(p.shape[0], n, 0)[0] * _rest(p.shape) for p in ps)
        if n > 1:
            gathers = 1 if unit == "root" or not spec.reshard_after_forward else 2
            out.append(g.coll("fsdp", "all_gather", shard_role, n * shard * spec.param_bytes, gathers))
            out.append(g.coll("fsdp", "reduce_scatter", shard_role, n * shard * spec.reduce_bytes))
        if L.dp_replicate > 1:
            out.append(g.coll("fsdp", "all_reduce", "dp_replicate", shard * spec.reduce_bytes))
    return out


def tp_collectives(cfg: ModelConfig, L: Layout, g: Groups, spec: StepSpec) -> list[Collective]:
    if L.tp == 1:
        return []
    fsdp = L.dp_shard * L.cp * L.dp_replicate > 1
    a = spec.local_tokens(L.cp) * cfg.hidden_size * spec.param_bytes  # one [B, T, D] activation
    grad_bytes = spec.param_bytes if fsdp else spec.master_bytes  # unsharded weight gradients
    ag = rs = ar = 0
    small: list[int] = []                                         # weight-gradient all-reduces
    types = cfg.resolved_layer_types()
    for i in range(cfg.num_layers):
        dense = not cfg.layer_is_moe(i)
        runs = 2 if spec.recomputed(i) else 1   # forwards: activation checkpointing repeats one
        ag += 2 * runs + 2              # fwd: mixer in, MLP in; bwd: mixer out, MLP out
        rs += runs + 1                  # fwd: mixer out; bwd: mixer in
        if dense:
            rs += runs + 1              # fwd: MLP out; bwd: MLP in
        elif cfg.shared_expert_intermediate_size > 0:
            ar += runs + 1              # shared expert: fwd: row-parallel out; bwd: input grad
        if types[i] == FULL_ATTENTION:
            small += [cfg.head_dim * grad_bytes] * 2                       # q_norm, k_norm
            if L.tp > cfg.num_key_value_heads:                             # replicated k/v_proj
                kv = cfg.num_key_value_heads * cfg.head_dim * cfg.hidden_size
                small += [kv * grad_bytes] * 2
        else:
            small.append(cfg.linear_value_head_dim * grad_bytes)          # gated norm
        small += [cfg.hidden_size * grad_bytes] * 2                        # the SP norms
    ag += 2                             # layer 0's input (bwd), the last layer's output (fwd)
    uses = 1 + cfg.mtp_num_layers       # embedding + LM head + CE: main, then each MTP depth
    ar += 2 * uses                      # embedding output (fwd), LM-head input grad (bwd)
    ce = spec.local_tokens(L.cp) * 4    # [B, T] fp32: max, sum of exp, target logit
    out = [g.coll("tp", "all_gather", "tp", a, ag), g.coll("tp", "reduce_scatter", "tp", a, rs),
           g.coll("tp", "all_reduce", "tp", a, ar), g.coll("tp", "all_reduce", "tp", ce, 3 * uses)]
    for size, count in sorted(_count(small).items()):
        out.append(g.coll("tp", "all_reduce", "tp", size, count))
    return out


def moe_calls(cfg: ModelConfig) -> int:
    """MoE blocks run per forward: decoder layers, then MTP layers."""
    if cfg.mlp_type != "moe":
        return 0
    return sum(cfg.layer_is_moe(i) for i in range(cfg.num_layers)) + cfg.mtp_num_layers


def ep_collectives(cfg: ModelConfig, L: Layout, g: Groups, spec: StepSpec,
                   traffic: Optional[EPTraffic] = None) -> list[Collective]:
    if L.ep == 1:
        return []
    P, E, k = L.ep, cfg.num_experts, cfg.num_experts_per_tok
    calls = moe_calls(cfg)
    # Recomputed forwards (activation checkpointing) exchange counts and rows once more.
    again = sum(cfg.layer_is_moe(i) and spec.recomputed(i) for i in range(cfg.num_layers))
    counts = g.coll("ep", "all_to_all", "ep", E * 8, calls + again)
    counts.sent = (calls + again) * Fraction(E * 8 * (P - 1), P)
    row_calls = 4 * calls + 2 * again   # dispatch + combine, forward + backward (+ recompute)
    if traffic is None:  # uniform routing: each rank sends and receives N*k rows, (P-1)/P abroad
        row = cfg.hidden_size * spec.param_bytes
        rows = row_calls * spec.local_tokens(L.cp) * k
        rows_sent = Fraction(rows * (P - 1), P)
        tokens = Collective("ep", "all_to_all", g.labels["ep"], P, 0, row_calls,
                            sent=rows_sent * row, payload_all=rows * row, role="ep")
    else:
        tokens = Collective("ep", "all_to_all", g.labels["ep"], P, 0, row_calls,
                            sent=Fraction(traffic.sent_bytes),
                            payload_all=traffic.sent_bytes + traffic.local_bytes, role="ep")
    return [counts, tokens]


def vision_collectives(cfg: ModelConfig, params: list[Param], L: Layout, g: Groups,
                       spec: StepSpec) -> list[Collective]:
    if cfg.vision is None or L.tp == 1 or spec.vision_plan != "balanced":
        return []
    from parallel.vision_plan import assign_items

    out = []
    v = cfg.vision
    rows = [p // v.merge_unit for p in spec.image_patches]
    if rows:
        shares = assign_items(list(spec.image_patches), L.tp)
        max_rows = max(sum(rows[i] for i in s) for s in shares)
        if max_rows:
            out.append(g.coll("vision", "all_gather", "vision",
                              L.tp * max_rows * cfg.hidden_size * spec.param_bytes))
    # reduce_vision_grads: this rank's gradient shards (FSDP) or whole gradients, 64 MiB buckets
    n = L.dp_shard * L.cp if L.dp_shard * L.cp * L.dp_replicate > 1 else 1
    rank = spec.rank // L.tp % n if n > 1 else 0   # its index in the dp_shard x cp group
    bucket, buckets = 0, []
    for p in params:
        if p.unit != "visual":
            continue
        bucket += _chunk_rows(p.shape[0], n, rank)[1] * _rest(p.shape) * spec.master_bytes
        if bucket >= VISION_BUCKET_BYTES:
            buckets.append(bucket)
            bucket = 0
    if bucket:
        buckets.append(bucket)
    for size, count in sorted(_count(buckets).items()):
        out.append(g.coll("vision", "all_reduce", "vision", size, count))
    return out


def cp_collectives(cfg: ModelConfig, L: Layout, g: Groups, spec: StepSpec) -> list[Collective]:
    if L.cp == 1:
        return []
    from parallel.spec import cp_modules

    n, act = spec.local_tokens(L.cp), spec.param_bytes
    summary = max(act, 4)                       # fp32 at least: GDN summaries, MoE counts, losses
    roles = cp_modules(meta_model(cfg))         # which modules exchange what, by parallel/spec.py

    def layer_of(name: str) -> Optional[int]:   # decoder layer index (MTP blocks: None)
        return int(name.split(".")[1]) if name.startswith("layers.") else None
    kv_heads = max(cfg.num_key_value_heads // L.tp, 1)
    kv = L.cp * n * 2 * kv_heads * cfg.head_dim * act
    channels = (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
                + cfg.linear_num_value_heads * cfg.linear_value_head_dim) // L.tp
    halo = L.cp * (cfg.linear_conv_kernel_dim - 1) * channels * act
    kd, vd = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    state = L.cp * (cfg.linear_num_value_heads // L.tp) * kd * (vd + kd) * summary
    out = []

    def calls(role: str) -> tuple[int, int]:
        """(forward calls, recomputed ones) of the modules with cp role `role`."""
        names = roles[role]
        again = sum(layer_of(m) is not None and spec.recomputed(layer_of(m)) for m in names)
        return len(names), again

    def gathers(payload: int, role: str) -> None:
        fwd, again = calls(role)
        if fwd:
            out.append(g.coll("cp", "all_gather", "cp", payload, fwd + again))
            out.append(g.coll("cp", "all_reduce", "cp", payload, fwd))   # their backward

    gathers(kv, "kv_gather")
    gathers(halo, "state_passing")
    gathers(state, "state_passing")
    fwd, again = calls("loss_shares")
    if fwd:
        out.append(g.coll("cp", "all_reduce", "cp", cfg.num_experts * summary, fwd + again))
    counts = 1 + cfg.mtp_num_layers + (2 if cfg.vision is not None else 0)
    values = 2 + (cfg.mtp_num_layers > 0) + 2 * (cfg.mlp_type == "moe") + 2 * (cfg.vision is not None)
    out.append(g.coll("cp", "all_reduce", "cp", counts * 8))              # the loss counts
    out.append(g.coll("cp", "all_reduce", "cp", values * summary))        # the reported losses
    if spec.trainer and cfg.mlp_type == "moe":                            # the expert load
        out.append(g.coll("cp", "all_reduce", "cp", cfg.num_experts * moe_calls(cfg) * spec.master_bytes))
    return out


def trainer_collectives(cfg: ModelConfig, params: list[Param], L: Layout,
                        g: Groups) -> list[Collective]:
    out = []
    moe = cfg.mlp_type == "moe"
    if L.dp > 1:                                       # sum_over the loss group
        values = [1, 2 + (cfg.mtp_num_layers > 0) + 2 * moe]   # token total; loss, ce, mtp, aux, z
        if cfg.vision is not None:
            values.append(4)                           # per-modality CE sums and token counts
        if moe:
            values.append(cfg.num_experts * moe_calls(cfg))    # expert load, every router
        for v in values:
            out.append(g.coll("trainer", "all_reduce", "dp", v * SCALAR_BYTES))
    # Gradient norms: one float64 all-reduce per mesh dimension of each kind of sharding present.
    fsdp = L.dp_shard * L.cp * L.dp_replicate > 1
    rep = ["dp_replicate"] if L.dp_replicate > 1 else []
    dp_dims = rep + ["dp_shard"] if fsdp else []

    def key_dims(p: Param) -> tuple[str, ...]:
        if p.expert and L.ep > 1:
            return tuple(rep + ["expert_dp", "ep"])
        if p.tp is not None:
            return tuple(dp_dims + ["tp"]) + (("copies",) if p.tp == "replicate" else ())
        return tuple(dp_dims)

    def norm(ps: list[Param]) -> None:
        for dims in sorted({key_dims(p) for p in ps}):
            for role in dims:
                if role != "copies":
                    out.append(g.coll("trainer", "all_reduce", role, SCALAR_BYTES))

    if cfg.vision is not None:
        norm([p for p in params if p.unit == "visual"])       # vision_grad_norm
    norm(params)                                               # clipping
    return out


def _count(sizes: list[int]) -> dict[int, int]:
    out: dict[int, int] = defaultdict(int)
    for s in sizes:
        out[s] += 1
    return out


# ---- the step ----------------------------------------------------------------------------------

def predict(cfg: ModelConfig, layout: Layout, spec: StepSpec,
            ep_traffic: Optional[EPTraffic] = None) -> list[Collective]:
    """Every collective of one step on rank `spec.rank`, grouped (calls > 1 for repeats)."""
    if layout.pp != 1:
        raise ValueError(f"comm_model: pipeline parallelism is not modelled (layout pp={layout.pp})")
    g = Groups.of(layout)
    params = local_params(cfg, layout)
    out = (fsdp_collectives(params, layout, g, spec) + tp_collectives(cfg, layout, g, spec)
           + ep_collectives(cfg, layout, g, spec, ep_traffic)
           + vision_collectives(cfg, params, layout, g, spec) + cp_collectives(cfg, layout, g, spec))
    if spec.trainer:
        out += trainer_collectives(cfg, params, layout, g)
    return out


def to_table(collectives: list[Collective]) -> CommTable:
    table: CommTable = defaultdict(CommStat)
    for c in collectives:
        table[(c.kind, c.group)].add(CommStat(c.calls, c.payload_total(), c.sent_total()))
    return dict(sorted(table.items()))


def predict_table(cfg: ModelConfig, layout: Layout, spec: StepSpec,
                  ep_traffic: Optional[EPTraffic] = None) -> CommTable:
    return to_table(predict(cfg, layout, spec, ep_traffic))


def by_source(collectives: list[Collective]) -> dict[str, Fraction]:
    """Bytes sent per plan (fsdp, tp, ep, vision, cp, trainer)."""
    out: dict[str, Fraction] = defaultdict(Fraction)
    for c in collectives:
        out[c.source] += c.sent_total()
    return dict(out)
