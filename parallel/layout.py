"""The parallel layout as numbers: sizes resolved from `parallel.*`, the start-up checks, the table.

No torch.distributed here: `validate_layout` runs in config validation, before any process group,
and `Layout` computes every rank's coordinates and groups by arithmetic (what parallel/mesh.py
builds as DeviceMeshes, and what the tests compare those meshes against).

Rank order is Megatron's: tp varies fastest, then cp, then the data-parallel dims, pp slowest.
With ep > 1, dp_shard is split into (dp_shard_mod_ep, dp_shard_in_ep) as torchtitan's ParallelDims
does, so that an EP group is the dp_shard_in_ep x cp ranks (consecutive dp_shard ranks, then cp):
experts are carved from the FSDP ranks (Megatron's MoE parallel folding) and FSDP shards the expert
weights over the remaining dp_shard_mod_ep ranks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from model.config import ConfigError, ModelConfig
from parallel.config import ParallelConfig

PARAM_DTYPES = ("auto", "bf16", "fp32")
ACTIVATION_CHECKPOINTS = ("none", "full", "selective")
VISION_PLANS = ("balanced", "replicated")
# Pipeline schedules (parallel/pipeline.py): those with one stage per rank, then the multi-stage ones.
PP_SINGLE_SCHEDULES = ("gpipe", "1f1b")
PP_SCHEDULES = PP_SINGLE_SCHEDULES + ("interleaved_1f1b", "interleaved_zb", "zbv")
PP_ZERO_BUBBLE = ("interleaved_zb", "zbv")

# Which mesh axes (slowest to fastest) each group spans; see Layout.axes().
GROUP_AXES = {
    "pp": ("pp",),
    "dp_replicate": ("dp_replicate",),
    "dp_shard": ("dp_shard_mod_ep", "dp_shard_in_ep"),
    "cp": ("cp",),
    "tp": ("tp",),
    "dp": ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"),
    "fsdp": ("dp_shard_mod_ep", "dp_shard_in_ep", "cp"),      # the shard dim (HSDP adds dp_replicate)
    "ep": ("dp_shard_in_ep", "cp"),
    "expert_fsdp": ("dp_shard_mod_ep",),                       # the shard dim (HSDP adds dp_replicate)
    # cp ranks hold whole micro-batch losses (model/context_parallel.py), as tp ranks do.
    "loss": ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep"),
    # Every cp rank encodes its micro-batch's images (before the sequence is split), its share
    # of them over the tp group.
    "vision": ("tp",),
}


@dataclass(frozen=True)
class Layout:
    """Resolved sizes of the language plan; world = pp * dp_replicate * dp_shard * cp * tp."""

    world: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        """The data-parallel degree: ranks that read different data (cp and tp ranks read the same)."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_cp(self) -> int:
        """The FSDP shard degree of non-expert parameters."""
        return self.dp_shard * self.cp

    @property
    def dp_shard_mod_ep(self) -> int:
        """The FSDP shard degree of expert parameters (dp_shard * cp when ep == 1)."""
        return self.dp_shard * self.cp // self.ep

    @property
    def dp_shard_in_ep(self) -> int:
        """The dp_shard ranks inside one EP group (an EP group is dp_shard_in_ep x cp ranks)."""
        return self.ep // self.cp if self.ep > 1 else 1

    def axes(self) -> list[tuple[str, int]]:
        """(name, size) of every mesh axis, slowest to fastest; dp_shard is split in two."""
        in_ep = self.dp_shard_in_ep
        return [("pp", self.pp), ("dp_replicate", self.dp_replicate),
                ("dp_shard_mod_ep", self.dp_shard // in_ep), ("dp_shard_in_ep", in_ep),
                ("cp", self.cp), ("tp", self.tp)]

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate on every axis of `axes()`."""
        out = {}
        for name, size in reversed(self.axes()):
            rank, out[name] = divmod(rank, size)
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for name, size in self.axes():
            rank = rank * size + coords[name]
        return rank

    def group(self, kind: str, rank: int) -> list[int]:
        """Global ranks of `rank`'s group of `kind` (a key of GROUP_AXES), in mesh order."""
        if kind == "ep" and self.ep == 1:
            return [rank]
        if kind == "expert_fsdp" and self.ep == 1:
            kind = "fsdp"  # without EP, experts are sharded like every other parameter
        axes = GROUP_AXES[kind]
        sizes = dict(self.axes())
        c = self.coords(rank)
        out = []
        for values in itertools.product(*(range(sizes[a]) for a in axes)):
            out.append(self.rank_of({**c, **dict(zip(axes, values))}))
        return out

    def dp_rank(self, rank: int) -> int:
        """Which data shard `rank` reads, in [0, dp): equal for the tp and cp ranks of a dp rank."""
        c = self.coords(rank)
        return ((c["dp_replicate"] * (self.dp_shard // self.dp_shard_in_ep) + c["dp_shard_mod_ep"])
                * self.dp_shard_in_ep + c["dp_shard_in_ep"])


def validate_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int,
                    seq_len: int | None = None, world_source: str = "WORLD_SIZE",
                    grad_accum: int | None = None) -> Layout:
    """Check `parallel.*` against the model and the world size; return the resolved Layout.

    Raises ConfigError with one line naming the field(s), the value(s) and the rule. Runs before any
    process group exists: `world_size` comes from the environment (`world_source` names where).
    `grad_accum` (train.grad_accum), when given, is what a null parallel.pp_microbatches takes.
    """
    p = parallel

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for fld in ("pp", "dp_replicate", "cp", "tp", "ep"):
        need(getattr(p, fld) >= 1, f"parallel.{fld}={getattr(p, fld)!r}: must be >= 1")
    need(p.dp_shard >= 1 or p.dp_shard == -1,
         f"parallel.dp_shard={p.dp_shard!r}: must be >= 1, or -1 (what the world size leaves over)")
    _check_knobs(p)
    if p.pp > 1:
        _check_pipeline(p, model, grad_accum)
    # Rules of the model alone first: they hold whatever the world size.
    if p.tp > 1:
        for fld, why in _tp_split_fields(model):
            value = getattr(model, fld)
            need(value % p.tp == 0, f"parallel.tp={p.tp}: must divide model.{fld}={value} ({why})")
        kv = model.num_key_value_heads
        need(kv % p.tp == 0 or p.tp % kv == 0,
             f"parallel.tp={p.tp}: must divide model.num_key_value_heads={kv} or be a multiple of it "
             f"(KV heads are split across tensor-parallel ranks, or replicated when fewer)")
        if seq_len is not None and getattr(p, "sequence_parallel", True):
            need(seq_len % p.tp == 0,
                 f"parallel.tp={p.tp}: must divide data.seq_len={seq_len} (sequence parallelism "
                 f"splits every row's tokens across tensor-parallel ranks)")

    if p.cp > 1 and seq_len is not None:
        need(seq_len % (p.cp * p.tp) == 0,
             f"parallel.cp={p.cp}: parallel.cp*tp = {p.cp}*{p.tp} must divide data.seq_len={seq_len} "
             f"(context parallelism gives each rank an equal slice of every micro-batch's tokens, "
             f"which sequence parallelism splits again over tp)")
        halo = model.linear_conv_kernel_dim - 1
        need(seq_len // p.cp >= halo,
             f"parallel.cp={p.cp}: data.seq_len/cp = {seq_len // p.cp} must be >= "
             f"model.linear_conv_kernel_dim-1 = {halo} (the convolution's halo comes from one rank)")

    if p.ep > 1:
        moe = any(model.layer_is_moe(i) for i in range(model.num_layers))
        need(moe, f"parallel.ep={p.ep}: needs an MoE model (model.mlp_type={model.mlp_type!r}, "
                  f"model.mlp_only_layers={list(model.mlp_only_layers)} leave no MoE layer)")
        need(model.num_experts % p.ep == 0,
             f"parallel.ep={p.ep}: must divide model.num_experts={model.num_experts} "
             f"(each expert-parallel rank holds num_experts/ep experts)")

    need(world_size >= 1, f"{world_source}={world_size}: the world size must be >= 1")

    others = p.pp * p.dp_replicate * p.cp * p.tp
    others_s = f"{p.pp}*{p.dp_replicate}*{p.cp}*{p.tp}"
    world_s = f"the world size {world_size} (from {world_source})"
    if p.dp_shard == -1:
        need(world_size % others == 0,
             f"parallel.dp_shard=-1: {world_s} must be divisible by parallel.pp*dp_replicate*cp*tp "
             f"= {others_s} = {others} (dp_shard=-1 takes what the world size leaves over)")
        dp_shard = world_size // others
        resolved = f"; dp_shard=-1 resolved to {dp_shard} from {world_source}={world_size}"
    else:
        dp_shard, resolved = p.dp_shard, ""
        product = others * dp_shard
        need(product == world_size,
             f"parallel.pp*dp_replicate*dp_shard*cp*tp = {p.pp}*{p.dp_replicate}*{dp_shard}*{p.cp}*{p.tp}"
             f" = {product}: must equal {world_s}")
    layout = Layout(world=world_size, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=dp_shard,
                    cp=p.cp, tp=p.tp, ep=p.ep)
    if p.pp > 1 and p.pp_schedule in PP_ZERO_BUBBLE:
        # Their weight backward walks the autograd graph from the stage's parameters: FSDP's
        # sharded parameters and TP's DTensors are not the tensors in that graph (torch 2.13).
        need(layout.dp == 1 and p.tp == 1,
             f"parallel.pp_schedule={p.pp_schedule!r}: zero-bubble schedules do not compose with "
             f"FSDP or tensor parallelism (data-parallel size {layout.dp}{resolved}, parallel.tp="
             f"{p.tp}); use 1f1b or interleaved_1f1b there")
        need(p.cp == 1,
             f"parallel.pp_schedule={p.pp_schedule!r}: zero-bubble schedules do not compose with "
             f"context parallelism (parallel.cp={p.cp}: FSDP shards the parameters over the cp "
             f"ranks); use 1f1b or interleaved_1f1b there")

    if p.ep > 1:
        need(layout.dp_shard_cp % p.ep == 0,
             f"parallel.ep={p.ep}: must divide parallel.dp_shard*cp = {dp_shard}*{p.cp} = "
             f"{layout.dp_shard_cp} (experts are carved from the FSDP ranks, MoE parallel "
             f"folding{resolved})")
        need(p.ep % p.cp == 0, f"parallel.ep={p.ep}: must be a multiple of parallel.cp={p.cp} "
                               f"(an expert-parallel group spans whole context-parallel groups)")
    return layout


def _check_knobs(p: ParallelConfig) -> None:
    def choice(value, allowed, fld):
        if value not in allowed:
            raise ConfigError(f"{fld}={value!r}: must be one of {', '.join(map(repr, allowed))}")

    choice(p.param_dtype, PARAM_DTYPES, "parallel.param_dtype")
    choice(p.activation_checkpoint, ACTIVATION_CHECKPOINTS, "parallel.activation_checkpoint")
    choice(p.vision.name, VISION_PLANS, "parallel.vision.name")
    choice(p.pp_schedule, PP_SCHEDULES, "parallel.pp_schedule")
    if p.selective_ac_every < 1:
        raise ConfigError(f"parallel.selective_ac_every={p.selective_ac_every!r}: must be >= 1")
    if p.expert_capacity_factor is not None and not p.expert_capacity_factor > 0:
        raise ConfigError(f"parallel.expert_capacity_factor={p.expert_capacity_factor!r}: must be > 0, "
                          f"or null (dropless)")
    if not p.collective_timeout_s > 0:
        raise ConfigError(f"parallel.collective_timeout_s={p.collective_timeout_s!r}: must be > 0")


def stage_layer_counts(p: ParallelConfig, num_layers: int) -> list[int]:
    """Decoder layers of each of the pp * pp_virtual_stages pipeline stages, in stage order."""
    stages = p.pp * p.pp_virtual_stages
    if p.pp_layers_per_stage is not None:
        return [int(n) for n in p.pp_layers_per_stage]
    return [num_layers // stages] * stages


def pipeline_microbatches(p: ParallelConfig, grad_accum: int | None) -> int | None:
    """parallel.pp_microbatches resolved (null takes train.grad_accum); None if neither is known."""
    return p.pp_microbatches if p.pp_microbatches is not None else grad_accum


def _check_pipeline(p: ParallelConfig, model: ModelConfig, grad_accum: int | None) -> None:
    """The rules of parallel.pp > 1: schedule, virtual stages, the layer split, micro-batches."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    v, stages = p.pp_virtual_stages, p.pp * p.pp_virtual_stages
    sched = f"parallel.pp_schedule={p.pp_schedule!r}"
    need(v >= 1, f"parallel.pp_virtual_stages={v}: must be >= 1")
    if p.pp_schedule in PP_SINGLE_SCHEDULES:
        need(v == 1, f"parallel.pp_virtual_stages={v}: {sched} runs one stage per rank; set it to 1 "
                     f"or use parallel.pp_schedule=interleaved_1f1b")
    elif p.pp_schedule == "zbv":
        need(v == 2, f"parallel.pp_virtual_stages={v}: {sched} runs exactly 2 stages per rank (a V)")
    else:
        need(v >= 2, f"parallel.pp_virtual_stages={v}: {sched} interleaves several stages per rank; "
                     f"set it to >= 2, or use parallel.pp_schedule=1f1b for one stage per rank")
    need(not model.tie_word_embeddings,
         f"parallel.pp={p.pp}: model.tie_word_embeddings=true is not supported under pipeline "
         f"parallelism (the embedding lives on the first stage, the LM head on the last)")
    where = f"parallel.pp * pp_virtual_stages = {p.pp}*{v} = {stages} stages"
    if p.pp_layers_per_stage is None:
        need(model.num_layers % stages == 0,
             f"model.num_layers={model.num_layers}: must be divisible by {where} (even split), or "
             f"set parallel.pp_layers_per_stage to a list of {stages} layer counts")
    else:
        counts = list(p.pp_layers_per_stage)
        need(len(counts) == stages, f"parallel.pp_layers_per_stage={counts}: needs one entry per "
                                    f"stage, {where}")
        need(all(n >= 0 for n in counts), f"parallel.pp_layers_per_stage={counts}: counts must be >= 0")
        need(all(n >= 1 for n in counts[1:-1]),
             f"parallel.pp_layers_per_stage={counts}: a middle stage needs >= 1 layer (only the first "
             f"and last stages carry other modules)")
        need(sum(counts) == model.num_layers,
             f"parallel.pp_layers_per_stage={counts}: sums to {sum(counts)}, must equal "
             f"model.num_layers={model.num_layers}")
    if p.pp_microbatches is not None:
        need(p.pp_microbatches >= 1, f"parallel.pp_microbatches={p.pp_microbatches}: must be >= 1 or "
                                     f"null (= train.grad_accum)")
        need(grad_accum is None or grad_accum == p.pp_microbatches,
             f"parallel.pp_microbatches={p.pp_microbatches} and train.grad_accum={grad_accum}: under "
             f"pipeline parallelism each micro-batch is one loader batch, so they must agree "
             f"(leave parallel.pp_microbatches null to take train.grad_accum)")
    m = pipeline_microbatches(p, grad_accum)
    if m is None:
        return
    field_name = "parallel.pp_microbatches" if p.pp_microbatches is not None else "train.grad_accum"
    if p.pp_schedule != "gpipe":
        need(m >= p.pp, f"{field_name}={m}: {sched} needs at least parallel.pp={p.pp} micro-batches "
                        f"(fewer leave stages idle; gpipe accepts any number)")
    if p.pp_schedule in ("interleaved_1f1b", "interleaved_zb"):
        rounds = max(1, m // p.pp)
        need(m % rounds == 0, f"{field_name}={m}: {sched} needs a multiple of "
                              f"max(1, micro-batches // pp) = {rounds} micro-batches (use a multiple "
                              f"of parallel.pp={p.pp})")


def _tp_split_fields(model: ModelConfig) -> list[tuple[str, str]]:
    """(model field, why) for every size that tensor parallelism splits across its ranks."""
    out = [("num_attention_heads", "attention heads are split across tensor-parallel ranks"),
           ("linear_num_key_heads", "Gated DeltaNet key heads are split across tensor-parallel ranks"),
           ("linear_num_value_heads", "Gated DeltaNet value heads are split across tensor-parallel ranks"),
           ("vocab_size", "the embedding and LM head are split by vocabulary")]
    layers = range(model.num_layers)
    if any(not model.layer_is_moe(i) for i in layers):
        out.append(("intermediate_size", "dense MLPs are split across tensor-parallel ranks"))
    if any(model.layer_is_moe(i) for i in layers) and model.shared_expert_intermediate_size > 0:
        out.append(("shared_expert_intermediate_size",
                    "the shared expert is split across tensor-parallel ranks"))
    return out


def layout_table(layout: Layout, model: ModelConfig, vision_plan: str = "balanced") -> str:
    """A table for the start-up log: each dimension, its size, rank 0's group and what it splits."""
    L, m = layout, model
    tp, ep = L.tp, L.ep
    moe = any(m.layer_is_moe(i) for i in range(m.num_layers))

    def split(n: int, k: int) -> str:
        return f"{n}->{n // k}"

    if tp > 1:
        kv = (split(m.num_key_value_heads, tp) if tp <= m.num_key_value_heads
              else f"{m.num_key_value_heads} replicated, 1 used")
        tp_what = (f"attention heads {split(m.num_attention_heads, tp)} per rank, KV heads "
                   f"{kv}, GDN heads k {split(m.linear_num_key_heads, tp)} "
                   f"v {split(m.linear_num_value_heads, tp)}, vocab {split(m.vocab_size, tp)} "
                   f"(embedding, LM head, cross-entropy); sequence parallel between TP regions"
                   + ("; the ViT is not TP-sharded" if m.vision is not None else ""))
    else:
        tp_what = "- (nothing split)"
    if not moe:
        ep_what = "- (dense model)"
    elif ep > 1:
        ep_what = (f"experts {m.num_experts}->{m.num_experts // ep} per EP rank, carved from "
                   f"dp_shard x cp (MoE parallel folding); tokens all-to-all within the group")
    else:
        ep_what = f"- (every rank holds all {m.num_experts} experts, FSDP-sharded)"
    rep = ", replicated over dp_replicate" if L.dp_replicate > 1 else ""
    if m.vision is None:
        vis_what = "- (text-only model)"
    elif tp == 1:
        vis_what = f"{vision_plan}: plain data parallel (each rank encodes its own images)"
    elif vision_plan == "balanced":
        vis_what = "balanced: each TP rank encodes a share of the images (by patch count), all-gathered"
    else:
        vis_what = "replicated: every TP rank encodes every image"

    rows = [
        ("tp", tp, "tp", tp_what),
        ("cp", L.cp, "cp", "- (whole sequences)" if L.cp == 1 else
         "each micro-batch's tokens in cp contiguous slices: attention all-gathers K/V, Gated "
         "DeltaNet passes its state (one summary per layer), the loss sums the slices' shares"),
        ("dp_shard", L.dp_shard, "dp_shard",
         "FSDP shards parameters, gradients, optimizer state; each rank its own data"),
        ("dp_replicate", L.dp_replicate, "dp_replicate",
         "HSDP replicas: gradients all-reduced across them" if L.dp_replicate > 1 else "- (no HSDP)"),
        ("pp", L.pp, "pp", "- (one stage)" if L.pp == 1 else "pipeline stages (decoder layers split "
         "over the pp ranks; the first also embeds, the last has the norm, LM head and MTP)"),
        ("ep", ep, "ep", ep_what),
        ("dp (data)", L.dp, "dp", "ranks reading different data; the tp and cp ranks of one read the same"),
        ("fsdp", L.dp_shard_cp, "fsdp", f"non-expert parameters sharded over dp_shard x cp{rep}"),
        ("expert fsdp", L.dp_shard_mod_ep, "expert_fsdp",
         "-" if not moe else f"expert parameters sharded over dp_shard x cp / ep{rep}" if ep > 1
         else "- (ep 1: experts sharded over fsdp with the rest)"),
        ("vision", tp, "vision", vis_what + ("; every cp rank encodes its micro-batch's images and "
                                             "keeps its slice's visual tokens" if L.cp > 1 and
                                             m.vision is not None else "")),
    ]
    head = (f"parallel layout: world {L.world} = pp {L.pp} x dp_replicate {L.dp_replicate} x dp_shard "
            f"{L.dp_shard} x cp {L.cp} x tp {tp}, ep {ep} (rank order: tp fastest, then cp, dp_shard, "
            f"dp_replicate, pp)")
    lines = [head, f"  {'dim':<13}{'size':>5}  {'rank 0 group':<18}what it splits"]
    for name, size, kind, what in rows:
        group = _fmt_group(L.group(kind, 0))
        lines.append(f"  {name:<13}{size:>5}  {group:<18}{what}")
    return "\n".join(lines)


def _fmt_group(ranks: list[int]) -> str:
    if len(ranks) > 6:
        return f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}]"
    return "[" + ", ".join(map(str, ranks)) + "]"
