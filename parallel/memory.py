"""Per-rank peak memory of a training step, predicted from the config (no model is built: the
parameter shapes come from `comm_model.local_params`, on the meta device).

    est = estimate_memory(model_cfg, layout, MemorySpec(micro_batch=1, seq_len=8192), rank=0)
    est.peak_bytes, est.summary()

The formula, per rank (P = this rank's parameters after TP/EP, on its pipeline stage(s); FSDP
shards each unit over n = dp_shard x cp ranks, experts under EP over dp_shard x cp / ep, each
parameter padded to ceil(dim0 / n) rows as FSDP2 does):

    params     = sum of shards x master bytes (fp32)
    grads      = sum of shards x grad bytes (fp32; with FSDP and grad_accum > 1 the unsharded
                 fp32 gradients of the no-sync micro-batches instead)
    optimizer  = 2 AdamW states x params
    fsdp       = 2 x the largest gathered unit (this one + the prefetched next) in the param dtype
                 + its unsharded gradient and reduce-scatter input + the root unit (embedding,
                 LM head: FSDP2 keeps it gathered); every unit when reshard_after_forward=false.
                 Without FSDP under bf16 autocast: autocast's bf16 copies of every weight.
    acts       = in-flight micro-batches x saved activations of one micro-batch + the backward
                 transient (parallel/memory_activations.py gives each module's saved bytes):
                 decoder layers (a checkpointed layer keeps only its input [N/tp, D]; the
                 recompute of the largest checkpointed layer comes back in its backward), the
                 gathered K/V under cp, the final norm + LM head + fp32 CE (log-softmax
                 [N, V/tp] saved; the transient is its gradient and the logits' gradient), MTP
                 depths, the ViT. In-flight: 1 without pipelining; 1F1B min(m, pp - r) on pp rank
                 r; gpipe m; interleaved schedules their warm-up depth in stage chunks.
    peak       = params + optimizer + max(backward: acts + fsdp + grads held then,
                                          optimizer step: grads + the foreach temporaries)

Gradients held during backward: without accumulation, those already made (the LM head's, then
each layer's from the last down, while the layers below still hold their activations); all of
them from the second micro-batch of an accumulation (or pipeline) on. `worst_rank` takes the maximum over pipeline stages.
tests/test_memory.py checks the estimate against parallel/memory_tracker.py on CPU (fp32, with
and without activation checkpointing, MoE and dense) to within 15%.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Optional

from model.config import ModelConfig
from parallel.comm_model import Param, local_params
from parallel.layout import Layout
from parallel.memory_activations import (ActShape, head_bytes, layer_bytes, layer_input_bytes,
                                         mtp_bytes, vision_bytes)

GIB = 1 << 30


@dataclass(frozen=True)
class MemorySpec:
    """One rank's step: micro_batch rows x seq_len tokens per micro-batch, and the knobs that
    change what is held."""

    micro_batch: int
    seq_len: int
    grad_accum: int = 1
    act_bytes: int = 2              # activations: 2 under bf16 autocast / FSDP bf16, 4 in fp32
    param_bytes: int = 2            # FSDP2 gathered compute dtype
    master_bytes: int = 4           # sharded parameters
    grad_bytes: int = 4             # sharded gradients (FSDP2 reduces in fp32)
    optimizer_states: int = 2       # AdamW: exp_avg, exp_avg_sq
    activation_checkpoint: str = "none"   # none | full | selective
    selective_ac_every: int = 2
    reshard_after_forward: bool = True
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    pp_microbatches: Optional[int] = None     # None: grad_accum
    pp_layers_per_stage: Optional[tuple[int, ...]] = None
    gdn_kernel: str = "fla"         # fla (CUDA) | torch (CPU: factors kept) | torch_recompute
    attention_kernel: str = "flash"  # flash (CUDA) | cpu
    gdn_pad: float = 1.0            # GDN chunk padding: padded tokens / tokens (short documents)
    image_patches: int = 0          # ViT patches per micro-batch on this rank
    foreach_optimizer: bool = False  # CPU AdamW (foreach): a params-sized temporary in the step

    def checkpointed(self, layer: int) -> bool:
        if self.activation_checkpoint == "full":
            return True
        return self.activation_checkpoint == "selective" and (layer + 1) % self.selective_ac_every == 0


@dataclass
class MemoryEstimate:
    """Bytes on one rank; `peak_bytes` is what the device must hold."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_peak_bytes: int
    fsdp_buffer_bytes: int
    peak_bytes: int
    rank: int = 0
    pp_rank: int = 0
    detail: dict = field(default_factory=dict)

    def summary(self) -> str:
        g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
        return (f"{g(self.peak_bytes)} GiB (params {g(self.params_bytes)}, grads "
                f"{g(self.grads_bytes)}, optimizer {g(self.optimizer_bytes)}, activations "
                f"{g(self.activations_peak_bytes)}, FSDP buffers {g(self.fsdp_buffer_bytes)}; "
                f"rank {self.rank})")


_PARAMS: dict[tuple, tuple[Param, ...]] = {}


def params_of(cfg: ModelConfig, L: Layout) -> tuple[Param, ...]:
    """`comm_model.local_params`, cached per (model, tp, ep): the suggester asks for many layouts
    and a meta build of the 397B model takes about a second."""
    key = (repr(cfg), L.tp, L.ep)
    if key not in _PARAMS:
        if len(_PARAMS) > 64:
            _PARAMS.clear()
        _PARAMS[key] = tuple(local_params(cfg, Layout(world=L.tp * L.ep, dp_shard=L.ep, tp=L.tp,
                                                      ep=L.ep)))
    return _PARAMS[key]


def stage_layers(cfg: ModelConfig, L: Layout, spec: MemorySpec, pp_rank: int) -> tuple[list[int], bool, bool]:
    """(decoder layers, holds the first stage, holds the last stage) of pipeline rank pp_rank."""
    if L.pp == 1:
        return list(range(cfg.num_layers)), True, True
    v = spec.pp_virtual_stages
    stages = L.pp * v
    counts = (list(spec.pp_layers_per_stage) if spec.pp_layers_per_stage
              else [cfg.num_layers // stages] * stages)
    starts = [sum(counts[:s]) for s in range(stages)]
    ids = ([pp_rank, 2 * L.pp - 1 - pp_rank] if spec.pp_schedule == "zbv"
           else [pp_rank + k * L.pp for k in range(v)])
    layers = [i for s in ids for i in range(starts[s], starts[s] + counts[s])]
    return layers, 0 in ids, stages - 1 in ids


def _unit_holds(p: Param, layers: set[int], first: bool, last: bool) -> bool:
    parts = p.name.split(".")
    if parts[0] == "layers":
        return int(parts[1]) in layers
    if parts[0] in ("visual", "embed_tokens"):
        return first
    return last     # norm, lm_head, mtp


def _inflight(L: Layout, spec: MemorySpec, pp_rank: int) -> float:
    """Micro-batches whose activations one rank holds at once (in units of all its stages)."""
    m = spec.pp_microbatches or spec.grad_accum
    if L.pp == 1:
        return 1
    if spec.pp_schedule == "gpipe":
        return m
    if spec.pp_schedule == "1f1b":
        return min(m, L.pp - pp_rank)
    v = 2 if spec.pp_schedule == "zbv" else spec.pp_virtual_stages
    chunks = (L.pp - pp_rank - 1) * 2 + (v - 1) * L.pp + 1     # the interleaved warm-up depth
    return min(m * v, chunks) / v


def estimate_memory(cfg: ModelConfig, L: Layout, spec: MemorySpec, rank: int = 0) -> MemoryEstimate:
    """The peak of `rank` (its pipeline stage decides its layers; FSDP padding is ignored per rank)."""
    pp_rank = L.coords(rank)["pp"]
    layers, first, last = stage_layers(cfg, L, spec, pp_rank)
    held = [p for p in params_of(cfg, L) if _unit_holds(p, set(layers), first, last)]
    fsdp_n = L.dp_shard * L.cp
    expert_n = L.dp_shard_mod_ep if L.ep > 1 else fsdp_n

    # ---- parameters, gradients, optimizer, FSDP buffers
    units: dict[str, list[int]] = {}     # unit -> [sharded elements, full local elements]
    layer_shard: dict[int, int] = {}     # decoder layer -> its sharded elements
    for p in held:
        n = expert_n if p.unit.endswith(".experts") else fsdp_n
        rest = math.prod(p.shape[1:]) if len(p.shape) > 1 else 1
        sharded = math.ceil(p.shape[0] / n) * rest if p.shape else 1
        u = units.setdefault(p.unit, [0, 0])
        u[0] += sharded
        u[1] += math.prod(p.shape)
        if p.name.startswith("layers."):
            i = int(p.name.split(".")[1])
            layer_shard[i] = layer_shard.get(i, 0) + sharded
    shard = sum(u[0] for u in units.values())
    full = sum(u[1] for u in units.values())
    fsdp = fsdp_n > 1
    params = shard * spec.master_bytes
    optimizer = spec.optimizer_states * params
    grads = shard * spec.grad_bytes
    accumulating = spec.grad_accum > 1 or L.pp > 1
    if fsdp and accumulating:   # no-sync micro-batches accumulate unsharded fp32 gradients
        grads_held = full * spec.grad_bytes
    elif accumulating:
        grads_held = grads
    else:                       # the LM head's gradient is made while its logits' grad lives
        head = next((p for p in held if p.name == "lm_head.weight"), None)
        grads_held = math.prod(head.shape) * spec.grad_bytes if head else 0
    # Gradients already made when layer i's backward runs: without accumulation they grow from
    # the head down (the last layers' while the first layers' activations still live).
    made, running = {}, grads - sum(layer_shard.values()) * spec.grad_bytes   # head, norms, embed
    for i in reversed(layers):
        made[i] = grads_held if accumulating else running
        running += layer_shard.get(i, 0) * spec.grad_bytes
    if fsdp:
        biggest = max((u[1] for k, u in units.items() if k != "root"), default=0)
        root = units.get("root", [0, 0])[1]
        if spec.reshard_after_forward:
            gathered = 2 * biggest * spec.param_bytes + root * spec.param_bytes
        else:
            gathered = full * spec.param_bytes
        buffers = gathered + biggest * (spec.param_bytes + spec.grad_bytes)
    else:   # bf16 autocast caches a bf16 copy of each weight it casts
        buffers = full * spec.act_bytes if spec.act_bytes < spec.master_bytes else 0

    # ---- activations of one micro-batch on this rank's stages
    # Under context parallelism the layers see this rank's slice of the micro-batch.
    s = ActShape(tokens=spec.micro_batch * spec.seq_len // L.cp, seq_len=spec.seq_len, tp=L.tp,
                 sp=spec.sequence_parallel and L.tp > 1, a=spec.act_bytes,
                 gdn_kernel=spec.gdn_kernel, attention_kernel=spec.attention_kernel,
                 gdn_pad=spec.gdn_pad)
    per_layer = {i: layer_bytes(cfg, i, s, L.ep) for i in layers}
    kept = {i: layer_input_bytes(cfg, s) if spec.checkpointed(i) else per_layer[i] for i in layers}
    types = cfg.resolved_layer_types()
    other = 2 * s.tokens * cfg.rotary_dim * 4                 # cos, sin
    if L.cp > 1:  # each attention layer saves the all-gathered K and V of the whole micro-batch
        attn = sum(types[i] == "full_attention" for i in layers) + (cfg.mtp_num_layers if last else 0)
        kv_heads = max(1, cfg.num_key_value_heads // L.tp)
        other += attn * s.tokens * L.cp * 2 * kv_heads * cfg.head_dim * s.a
    if first:
        other += vision_bytes(cfg, spec.image_patches, spec.act_bytes)
    head_saved = head_transient = 0
    if last:
        hs, head_transient = head_bytes(cfg, s)
        head_saved = hs * (1 + cfg.mtp_num_layers) + cfg.mtp_num_layers * mtp_bytes(cfg, s, L.ep)
    saved = other + sum(kept.values()) + head_saved           # one micro-batch, after its forward
    inflight = _inflight(L, spec, pp_rank)
    earlier = (inflight - 1) * saved
    # Backward starts at the LM head (its gradients on top of everything saved); then layer i
    # (last first) holds the layers below it, its own activations (recomputed when checkpointed)
    # and about half as much again in gradients.
    peak = saved + head_transient
    with_grads = peak + grads_held
    below = other
    for i in layers:
        peak = max(peak, below + per_layer[i] * 3 // 2)
        with_grads = max(with_grads, below + per_layer[i] * 3 // 2 + made[i])
        below += kept[i]
    with_grads = max(with_grads, other + (grads_held if accumulating else grads))
    p2p = 2 * s.residual_tokens * cfg.hidden_size * spec.act_bytes if L.pp > 1 else 0
    acts = int(earlier + peak) + p2p

    backward = int(earlier + with_grads) + p2p + buffers
    step = grads + (max(params, grads) if spec.foreach_optimizer else 0)
    peak = params + optimizer + max(backward, step)
    return MemoryEstimate(params, grads, optimizer, acts, buffers, peak, rank, pp_rank,
                          detail={"saved_per_microbatch": saved, "inflight": inflight,
                                  "head_transient": head_transient,
                                  "grads_held_in_backward": grads_held, "backward_phase": backward,
                                  "optimizer_phase": step})


def worst_rank(cfg: ModelConfig, L: Layout, spec: MemorySpec) -> MemoryEstimate:
    """The largest estimate over the pipeline stages (the first rank of each)."""
    per_stage = L.world // L.pp
    return max((estimate_memory(cfg, L, spec, r * per_stage) for r in range(L.pp)),
               key=lambda e: e.peak_bytes)


# ---- from the run's config -----------------------------------------------------------------------

def spec_from_config(root, device_type: str) -> MemorySpec:
    """A MemorySpec from a train.config.RootConfig on `device_type` (cpu | cuda)."""
    p, t, d = root.parallel, root.train, root.data
    cuda = device_type == "cuda"
    fsdp_bf16 = p.param_dtype == "bf16" or (p.param_dtype == "auto" and cuda)
    autocast_bf16 = t.autocast == "bf16" or (t.autocast == "auto" and cuda)
    act = 2 if (fsdp_bf16 or autocast_bf16) else 4
    patches = 0
    if root.model.vision is not None:   # worst case: every row at its visual-token cap
        patches = d.batch_size * d.visual_token_cap * root.model.vision.spatial_merge_size ** 2
    return MemorySpec(
        micro_batch=d.batch_size, seq_len=d.seq_len, grad_accum=t.grad_accum, act_bytes=act,
        param_bytes=2 if fsdp_bf16 else 4, activation_checkpoint=p.activation_checkpoint,
        selective_ac_every=p.selective_ac_every, reshard_after_forward=p.reshard_after_forward,
        pp_schedule=p.pp_schedule, pp_virtual_stages=p.pp_virtual_stages,
        pp_microbatches=p.pp_microbatches,
        pp_layers_per_stage=tuple(p.pp_layers_per_stage) if p.pp_layers_per_stage else None,
        gdn_kernel="fla" if cuda else "torch", attention_kernel="flash" if cuda else "cpu",
        image_patches=patches, foreach_optimizer=not cuda)


def device_memory_bytes(device_type: str) -> int:
    """Total memory of this machine's device 0: CUDA's, or physical RAM on CPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def with_spec(spec: MemorySpec, **changes) -> MemorySpec:
    return replace(spec, **changes)
