"""The parallel layout's config schema (`parallel.*`, configs/parallel/).

The language plan is `pp x dp_replicate x dp_shard x cp x tp` (tp fastest-varying, as Megatron
orders ranks), with experts laid out over `ep` ranks carved from `dp_shard x cp`. The vision plan
(`parallel.vision`, configs/parallel/vision/) is chosen independently of it. Checks live in
parallel/mesh.py and run before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class VisionPlanConfig:
    # balanced: the ViT runs data-parallel over the ranks of the language TP group, each rank
    #   encoding a share of the micro-batch's images balanced by patch count; embeddings are
    #   all-gathered back into sequence order. With tp=1 this is plain data parallelism.
    # replicated: every TP rank encodes every image (the baseline the balanced plan is measured against).
    name: str = "balanced"


@dataclass
class ParallelConfig:
    dp_replicate: int = 1       # HSDP replicas (e.g. one per node); FSDP shards within each
    dp_shard: int = -1          # FSDP shard group size; -1 = what the world size leaves over
    tp: int = 1                 # tensor parallel, always with sequence parallelism (as torchtitan)
    ep: int = 1                 # expert parallel, carved from dp_shard x cp
    pp: int = 1                 # pipeline-parallel ranks (parallel/pipeline.py)
    # Pipeline schedule: gpipe | 1f1b | interleaved_1f1b | interleaved_zb | zbv (see
    # parallel/pipeline.py SCHEDULES); the interleaved ones run pp_virtual_stages stages per rank.
    pp_schedule: str = "1f1b"
    # Micro-batches per optimizer step through the pipeline, each one loader batch; null takes
    # train.grad_accum. 1F1B needs at least pp of them.
    pp_microbatches: Optional[int] = None
    pp_virtual_stages: int = 1  # stages per pp rank: 1 for gpipe/1f1b, >= 2 interleaved, 2 for zbv
    # Decoder layers per stage (pp * pp_virtual_stages entries, summing to model.num_layers; the
    # first and last may be 0: they also carry the embedding + vision tower and the norm + LM head +
    # MTP). null = an even split.
    pp_layers_per_stage: Optional[List[int]] = None
    # Context parallel: each micro-batch's tokens split into cp contiguous slices, one per rank
    # (model/context_parallel.py); composes with tp, ep, FSDP and pp.
    cp: int = 1
    # FSDP2 compute dtype: auto = bf16 on GPU, fp32 on CPU (exact comparisons); reduce and master
    # weights stay fp32.
    param_dtype: str = "auto"           # auto | bf16 | fp32
    reshard_after_forward: bool = True  # ZeRO-3 style; false keeps layers gathered until backward
    activation_checkpoint: str = "none"  # none | full (every decoder layer) | selective
    selective_ac_every: int = 2         # selective: checkpoint every Nth decoder layer
    # Routed-expert capacity under EP: null = dropless; c > 0 keeps at most
    # ceil(c * tokens * top_k / experts) tokens per expert and counts the dropped ones.
    expert_capacity_factor: Optional[float] = None
    collective_timeout_s: float = 600.0  # a collective that hangs longer fails, naming itself
    vision: VisionPlanConfig = field(default_factory=VisionPlanConfig)
