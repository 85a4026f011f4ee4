"""Pipeline parallelism: the model split into stages over the `pp` ranks and run by a schedule of
`torch.distributed.pipelining` (GPipe, 1F1B, interleaved 1F1B, zero bubble).

    runner = build_pipeline(model, meshes, cfg.parallel, device, num_microbatches)
    optimizer = build_optimizer(runner.model, cfg.train)    # this rank's parameters, full names
    sums, modality = runner.step(micro_batches, total_tokens)  # forward + backward of all of them

Order of the plans (parallel/plan.py states it for every layout): expert parallelism, tensor +
sequence parallelism, the vision plan and activation checkpointing are applied to the whole model
(they work per module, so the stages inherit them); then the model is cut into this rank's stages
by the stage roles of parallel/spec.py (parallel/pipeline_stage.py), tensor parallelism gets its
hooks at the new stage boundaries, and FSDP2 shards each stage as its own root. Stage s lives on pp rank s % pp ("loop": interleaved
schedules give rank r the stages r, r + pp, ...), except ZBV's V: rank r holds r and 2pp-1-r.

Micro-batches are loader batches: each keeps its own document boundaries and images, so the
vision tower runs per micro-batch on the first stage exactly as in one process. Losses: every
micro-batch's loss (CE + MTP + MoE aux, as Qwen35LM.forward) is weighted by its share of the
global batch's loss tokens, like the trainer's gradient accumulation, and the schedule does not
rescale (`scale_grads=False`): gradients are the sum over micro-batches (and, through FSDP, over
data-parallel ranks) of the weighted losses' gradients, so pp=N equals one process accumulating
the same micro-batches.

Restrictions: tied embeddings (the embedding and LM head would live on different stages); context
parallelism (not in the framework yet); the zero-bubble schedules only without FSDP and TP (their
weight-gradient pass takes the stage's registered parameters, which under FSDP2 and DTensor TP are
not the tensors in the autograd graph; parallel/layout.py refuses those layouts). The stage
boundary under TP sends the full sequence on every TP rank (the stage's last layer all-gathers it,
as the model's last layer does), not Megatron's sequence-parallel shard. The trainer builds the model on
the meta device, so the other stages' layers never hold memory; only this rank's stages are
materialised (parallel/materialize.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                    ScheduleInterleaved1F1B,
                                                    ScheduleInterleavedZeroBubble,
                                                    ScheduleZBVZeroBubble)

from model.language_model import Qwen35LM
from model.moe import routers
from parallel.activation_checkpoint import ContextFn
from parallel.config import ParallelConfig
from parallel.fsdp import apply_fsdp
from parallel.grads import grad_square_sum
from parallel.layout import stage_layer_counts
from parallel.pipeline_stage import LocalStages, PipelineStageModule, stage_layer_ranges
from parallel.plan import apply_module_plans, fsdp_param_dtype
from parallel.runner import StepRunner
from parallel.spec import QWEN35_SPEC, ModuleSpec

log = logging.getLogger("parallel")

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
# The fields of a loader batch that the stages take (as keyword arguments, on every stage).
BATCH_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw")


def stage_ids(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """The stage indices pp rank `pp_rank` runs, in order."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]


def parallelize_pipeline(model: Qwen35LM, meshes, pcfg: ParallelConfig, device: torch.device,
                         ac_context_fn: Optional[ContextFn] = None,
                         spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> list[PipelineStageModule]:
    """Apply the plans to `model` (built on meta, or whole) and return this rank's stages,
    sharded (parallel/plan.py states the order). The model object itself is not used afterwards."""
    # 1-4. EP, TP + SP, the vision plan, activation checkpointing: per module, on the whole model.
    apply_module_plans(model, meshes, pcfg, ac_context_fn, spec)

    # 5. Cut out this rank's stages.
    counts = stage_layer_counts(pcfg, model.cfg.num_layers)
    ranges = stage_layer_ranges(counts)
    shard = meshes.fsdp is not None and meshes.fsdp.size() > 1
    mp_dtype = fsdp_param_dtype(pcfg.param_dtype, device) if shard else None
    act_dtype = mp_dtype or model.embed_tokens.weight.dtype
    pp_rank = meshes.pp.get_local_rank()
    stages = []
    for s in stage_ids(pp_rank, pcfg.pp, pcfg.pp_virtual_stages, pcfg.pp_schedule):
        stage = PipelineStageModule(model, s, len(ranges), *ranges[s], act_dtype=act_dtype, spec=spec)
        if meshes.tp is not None:
            _tp_stage_boundaries(stage, meshes.tp, model.cfg.num_layers)
        # 6. FSDP2, each stage its own root.
        if shard:  # each stage its own root; the carried MoE loss sums stay fp32
            apply_fsdp(stage, meshes.fsdp, param_dtype=mp_dtype,
                       reshard_after_forward=pcfg.reshard_after_forward,
                       expert_mesh=meshes.expert_fsdp, spec=spec, cast_root_inputs=False)
        stages.append(stage)
    log.info("pipeline rank %d: stages %s, layers %s (split %s)", pp_rank,
             [s.stage_index for s in stages], [s.layer_range for s in stages], counts)
    return stages


def _tp_stage_boundaries(stage: PipelineStageModule, tp_mesh, num_layers: int) -> None:
    """Stages hand each other the full (replicated) sequence: a stage's first layer takes it as
    the model's first layer takes the embeddings, its last layer gathers it as the model's last
    layer does. The model's own first and last layers have these hooks already."""
    from parallel.tensor_parallel import stack_boundaries

    start, end = stage.layer_range
    if end > start:
        stack_boundaries(stage.layers[str(start)], stage.layers[str(end - 1)], tp_mesh,
                         first=start > 0, last=end < num_layers)


@dataclass
class ActionTimes:
    """Busy time of this rank's stage actions (forward, backward, weight backward) in one step."""

    step_s: float = 0.0
    busy_s: float = 0.0
    actions: list[tuple[str, int, int, float, float]] = field(default_factory=list)  # kind, stage, mb, t0, t1

    @property
    def bubble(self) -> float:
        """Idle share of the step: waiting for the neighbours (and the P2P transfers themselves)."""
        return 1.0 - self.busy_s / self.step_s if self.step_s else 0.0


class PipelineRunner(StepRunner):
    """Runs this rank's stages through the configured schedule (parallel/runner.py's interface).
    Build with `parallel.plan.parallelize` (or `build_pipeline`)."""

    def __init__(self, stages: list[PipelineStageModule], meshes, pcfg: ParallelConfig,
                 device: torch.device, num_microbatches: int, all_routers: dict[int, int],
                 num_routers: int):
        super().__init__(LocalStages(stages), meshes, device)
        self.stages = stages
        self.pcfg = pcfg
        self.num_microbatches = num_microbatches
        self.group = meshes.pp.get_group()
        self.cfg = stages[0].cfg
        self._router_rows = all_routers  # id(router) -> row in the model's expert-load table
        self._num_routers = num_routers
        self._schedule = None
        self._shape: Optional[tuple[int, int]] = None
        self.timing = False  # True: record ActionTimes of every step in self.times
        self.times = ActionTimes()

    @property
    def has_first(self) -> bool:
        return any(s.is_first for s in self.stages)

    @property
    def has_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def set_forward_context(self, factory: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Context for every stage forward (autocast, FP8 autocast), e.g. lambda: autocast(...)."""
        super().set_forward_context(factory)
        for s in self.stages:
            s.forward_context = factory

    # ---- the schedule --------------------------------------------------------------------------

    def _build_schedule(self, rows: int, seqlen: int) -> None:
        """PipelineStages with static shapes (no shape-inference pass through the model, which would
        run the MoE routers on garbage and count their loads) for micro-batches of [rows, seqlen]."""
        pcfg, n = self.pcfg, self.stages[0].num_stages
        pipe_stages = [
            PipelineStage(s, s.stage_index, n, self.device, input_args=s.example_inputs(rows, seqlen),
                          output_args=s.example_outputs(rows, seqlen), group=self.group)
            for s in self.stages]
        cls = SCHEDULES[pcfg.pp_schedule]
        kw = dict(n_microbatches=self.num_microbatches, loss_fn=_weighted, scale_grads=False)
        single = pcfg.pp_schedule in ("gpipe", "1f1b")
        self._schedule = cls(pipe_stages[0], **kw) if single else cls(pipe_stages, **kw)
        self._pipe_stages = pipe_stages
        self._shape = (rows, seqlen)
        if self.timing:
            for st in pipe_stages:
                _time_actions(st, self.times)

    def step(self, micro_batches: list[dict], total_tokens: int) -> tuple[dict[str, float], dict[str, list]]:
        """Forward and backward of the micro-batches (loader batches, all of the same [B, T]) through
        the pipeline; gradients accumulate in this rank's parameters. `total_tokens`: the loss tokens
        of the global batch (all micro-batches of all data-parallel ranks), the weights' denominator.

        -> (sums, modality) as the trainer accumulates them, equal on every pp rank: sums[name] =
        sum over micro-batches of weight * value for loss, ce (+ mtp_ce, moe_aux, moe_z); modality
        (vision models) = {"ce_after_vision": [CE x tokens, tokens], "ce_text": [...]}.
        """
        return self._gather_records(micro_batches, self.forward_backward(micro_batches, total_tokens))

    def forward_backward(self, micro_batches: list[dict], total_tokens: int) -> list[torch.Tensor]:
        """`step` without reading the results (the rehearsal runs it on fake tensors). -> the
        micro-batches' weights."""
        m = self.num_microbatches
        if len(micro_batches) != m:
            raise ValueError(f"PipelineRunner.step: got {len(micro_batches)} micro-batches, the "
                             f"pipeline runs parallel.pp_microbatches={m} per step")
        shape = tuple(micro_batches[0]["input_ids"].shape)
        if any(tuple(b["input_ids"].shape) != shape for b in micro_batches):
            raise ValueError("PipelineRunner.step: every micro-batch must have the same [rows, seq_len] "
                             "(the stages exchange fixed-shape tensors)")
        if self._schedule is None or self._shape != shape:
            self._build_schedule(*shape)
        dtype = self.stages[0].aux_dtype
        kwargs = [{k: b[k].to(self.device) for k in BATCH_KEYS if b.get(k) is not None}
                  for b in micro_batches]
        args = [(kw["input_ids"],) for kw in kwargs] if self.has_first else None
        weights = [torch.tensor(b["num_tokens"] / max(total_tokens, 1), dtype=dtype, device=self.device)
                   for b in micro_batches]
        for s in self.stages:
            s.records.clear()
        t0 = time.perf_counter()
        if self.timing:
            self.times.actions.clear()
        self._run(args, kwargs, weights)
        if self.timing:
            self.times.step_s = time.perf_counter() - t0
            self.times.busy_s = sum(t1 - ta for _, _, _, ta, t1 in self.times.actions)
        return weights

    def _run(self, arg_mbs, kwarg_mbs, target_mbs) -> None:
        # What Schedule.step() does after splitting one batch along dim 0: here the micro-batches
        # come split already (each with its own document boundaries and images).
        for st in self._pipe_stages:
            st.has_backward = True
            st.clear_runtime_states()
        self._schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, None, return_outputs=False)

    def _gather_records(self, micro_batches, weights) -> tuple[dict[str, float], dict[str, list]]:
        names = ["loss", "ce"]
        if self.cfg.mtp_num_layers:
            names.append("mtp_ce")
        if self.stages[0].num_moe_layers:
            names += ["moe_aux", "moe_z"]
        vision = self.cfg.vision is not None
        values = torch.zeros(len(names) + (4 if vision else 0), dtype=torch.float64)
        for s in self.stages:
            for rec, w in zip(s.records, weights):
                for i, name in enumerate(names):
                    values[i] += float(w) * float(rec[name])
                if vision:
                    for j, key in enumerate(("after_vision", "text")):
                        n = float(rec[f"num_tokens_{key}"])
                        values[len(names) + 2 * j] += float(rec[f"ce_{key}"]) * n
                        values[len(names) + 2 * j + 1] += n
        values = values.to(self.device)
        dist.all_reduce(values, group=self.group)  # only the last stage's rank holds non-zeros
        values = values.tolist()
        sums = dict(zip(names, values))
        modality = {}
        if vision:
            k = len(names)
            modality = {"ce_after_vision": [values[k], int(values[k + 1])],
                        "ce_text": [values[k + 2], int(values[k + 3])]}
        return sums, modality

    # ---- what the trainer needs across stages -------------------------------------------------

    @torch.no_grad()
    def grad_norm(self, params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """The global gradient norm over all stages (fp32 scalar, equal on all ranks): pass it to
        parallel.grads.clip_grad_norm_(params, max_norm, norm=...)."""
        params = list(self.model.parameters()) if params is None else params
        sq = torch.tensor(grad_square_sum(params), dtype=torch.float64, device=self.device)
        dist.all_reduce(sq, group=self.group)  # the stages hold disjoint parameters
        return sq.sqrt().float().cpu()

    @torch.no_grad()
    def collect_expert_load(self) -> Optional[torch.Tensor]:
        """[num_moe_layers, E] token counts of the whole model since the last call (each rank's
        routers reset), as model.moe.collect_expert_load gives for pp=1; None without MoE."""
        if not self._num_routers:
            return None
        load = torch.zeros(self._num_routers, self.cfg.num_experts, device=self.device)
        for s in self.stages:
            for r in routers(s):
                load[self._router_rows[id(r)]] += r.tokens_per_expert
                r.tokens_per_expert.zero_()
        dist.all_reduce(load, group=self.group)
        if self.meshes.cp is not None:  # the slices' counts: the whole micro-batches'
            from parallel.context_parallel import sum_over_cp

            load = sum_over_cp(load, self.meshes.cp)
        return load.cpu()

    @torch.no_grad()
    def update_router_bias(self, load: torch.Tensor, rate: float) -> None:
        """model.moe.update_router_bias for this rank's routers, from the whole model's load."""
        for s in self.stages:
            for r in routers(s):
                if r.use_bias_balancing:
                    row = load[self._router_rows[id(r)]].to(r.expert_bias.device)
                    r.expert_bias += rate * torch.sign(row.mean() - row)


def _weighted(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The schedule's loss_fn: the last stage's micro-batch loss times its token share."""
    return loss * weight


def _time_actions(stage: PipelineStage, times: ActionTimes) -> None:
    """Wrap the stage's compute actions with wall-clock timers (for the bubble benchmark)."""
    for kind, name in (("F", "forward_one_chunk"), ("B", "backward_one_chunk"),
                       ("W", "backward_weight_one_chunk")):
        inner = getattr(stage, name)

        def timed(mb, *args, _inner=inner, _kind=kind, **kwargs):
            t0 = time.perf_counter()
            out = _inner(mb, *args, **kwargs)
            times.actions.append((_kind, stage.stage_index, mb, t0, time.perf_counter()))
            return out

        setattr(stage, name, timed)


def build_pipeline(model: Qwen35LM, meshes, pcfg: ParallelConfig, device: torch.device,
                   num_microbatches: int, ac_context_fn: Optional[ContextFn] = None,
                   spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> PipelineRunner:
    """Split `model` into this rank's stages, apply the parallel plans to them and return the
    runner (parallel.plan.parallelize calls this for pp > 1). Call on every rank after
    build_meshes; drop every other reference to `model` afterwards so that the other stages'
    layers are freed. `ac_context_fn`: the FP8 backend's activation-checkpoint contexts."""
    if meshes.pp is None:
        raise ValueError("build_pipeline needs parallel.pp > 1")
    all_routers = {id(r): i for i, r in enumerate(routers(model))}
    stages = parallelize_pipeline(model, meshes, pcfg, device, ac_context_fn, spec)
    return PipelineRunner(stages, meshes, pcfg, device, num_microbatches, all_routers, len(all_routers))
