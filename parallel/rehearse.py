"""Rehearse one training step of a layout before booking the cluster: one process plays rank R of N.

    python -m parallel.rehearse model=qwen35_397b_a17b parallel.tp=8 parallel.ep=16 --world-size 128 \
        [--rank R] [--json]
    python -m parallel.rehearse model=qwen35_397b_a17b --world-size 64 --suggest --gpu-mem-gib 141

The process group is torch's fake backend (every collective returns at once, moving nothing), the
model is built on the meta device, the meshes and every plan of the layout are applied by the same
code the trainer runs (`parallelize`, pipeline stages included), and the parameters are
materialised as fake tensors (the trainer's `materialize`, allocation only, under FakeTensorMode:
shapes, dtypes and storages, no memory). Then one step runs through the trainer's step runner on
train.grad_accum synthetic micro-batches of data.batch_size x data.seq_len (with pp > 1, through
this rank's stages by the pipeline schedule): forward, loss, backward, AdamW. parallel/memory_tracker.py counts
the bytes of the live storages: what this rank would hold on its GPU, without the allocator's
fragmentation, the CUDA context or the communication libraries' buffers. The reported peak is the
steady state's: the first step's forward and backward plus the optimizer state that later steps
carry through them.

Precision: as on the GPU when `train.autocast` / `parallel.param_dtype` are `auto` (bf16 compute,
FSDP gathers in bf16, fp32 master weights, gradients and AdamW state, and the fused AdamW kernel
the trainer uses on CUDA, which needs no parameter-sized temporaries); the step runs on a fake
CPU device, so no CUDA is needed.

Values are fake, so whatever reads them to the host must not: batch metadata (document boundaries,
label counts, image grids) are fake tensors carrying their real values (FakeTensorMode's constant
propagation, widened here to integer and bool tensors of up to 2^24 elements); the expert-parallel
split sizes, which depend on routing (fake), assume uniform routing (parallel/expert_parallel.py).
The Gated DeltaNet runs the PyTorch chunked path (fla's kernels need CUDA), recomputing its
intra-chunk factors in backward as on the GPU.

One rehearsal per process: torch's DTensor caches keep meshes of the fake group a second
`init_process_group` replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from parallel.memory_tracker import LiveBytes, grads, optimizer_tensors, tensor_bytes

# Integer / bool tensors up to this many elements keep their values under the rehearsal's fake mode.
CONSTANT_LIMIT = 1 << 24


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._mode_utils import no_dispatch

    aten = torch.ops.aten
    _FACTORIES = {aten.arange, aten.zeros, aten.ones, aten.full, aten.scalar_tensor}

    class RehearsalFakeMode(FakeTensorMode):
        """FakeTensorMode whose constant propagation (torch's: scalars) also keeps integer and bool
        tensors (document boundaries, masks, counts): what the model reads to the host is batch
        metadata, and AdamW reads its step counts."""

        def may_turn_const(self, t: torch.Tensor) -> bool:
            small = t.numel() <= 1 or (not t.is_floating_point() and not t.is_complex()
                                       and t.numel() <= CONSTANT_LIMIT)
            return (small and t.layout == torch.strided and not self.is_our_fake(t)
                    and t.device.type != "meta")

        def _dispatch_impl(self, func, types, args, kwargs):
            out = super()._dispatch_impl(func, types, args, kwargs)
            # Index tables built from sizes alone (torch.arange(T), zeros, ones) keep their values
            # too: torch's constant propagation needs a constant input tensor.
            if (func.overloadpacket in _FACTORIES and isinstance(out, FakeTensor)
                    and out.constant is None and out.device.type == "cpu"
                    and not out.is_floating_point() and out.numel() <= CONSTANT_LIMIT
                    and not any(isinstance(a, torch.Tensor) for a in tree_leaves((args, kwargs)))):
                with no_dispatch():
                    real = func(*args, **kwargs)
                return self.fake_tensor_converter.from_real_tensor(self, real, make_constant=True)
            return out

        def validate_and_convert_non_fake_tensors(self, func, converter, flat_args, args_spec):
            # Real metadata tensors met inside the mode (the batch, a DeviceMesh's rank table)
            # become fake tensors that keep their values.
            flat_args = [converter.from_real_tensor(self, a, make_constant=True)
                         if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor)
                         and type(a) is torch.Tensor and self.may_turn_const(a) else a
                         for a in flat_args]
            return super().validate_and_convert_non_fake_tensors(func, converter, flat_args,
                                                                 args_spec)

    return RehearsalFakeMode(allow_non_fake_inputs=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


@dataclass
class RehearsalReport:
    model: str
    layout: str
    world_size: int
    rank: int
    batch: list
    params_numel: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_peak_bytes: int
    peak_bytes: int
    images: int
    wall_s: float
    build_s: float
    step_s: float
    max_rss_bytes: int

    def lines(self) -> str:
        gib = 1 << 30
        rows = [("model", self.model), ("layout", self.layout),
                ("rank", f"{self.rank} of {self.world_size}"),
                ("batch", f"{self.batch[0]} x {self.batch[1]}" + (f" + {self.images} image(s)"
                                                                 if self.images else "")),
                ("params_numel", f"{self.params_numel:,}")]
        rows += [(k, f"{getattr(self, k):,} ({getattr(self, k) / gib:.2f} GiB)")
                 for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                           "activations_peak_bytes", "peak_bytes")]
        rows += [("wall_s", f"{self.wall_s:.1f} (build {self.build_s:.1f}, step {self.step_s:.1f})"),
                 ("host max RSS", f"{self.max_rss_bytes / gib:.2f} GiB")]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def synthetic_batch(cfg, rank: int) -> dict:
    """One loader-shaped batch of data.batch_size x data.seq_len random packed documents; with a
    vision tower, the first row starts with one image of the smallest grid (1 x 2m x 2m patches)."""
    from data.packing import random_batch

    b, t = cfg.data.batch_size, cfg.data.seq_len
    batch = random_batch(cfg.train.seed + rank, b, t, cfg.model.vocab_size,
                         doc_len=(max(2, t // 8), max(3, t // 2)))
    v = cfg.model.vision
    if v is None:
        return batch
    m = v.spatial_merge_size
    grid = torch.tensor([[1, 2 * m, 2 * m]])
    n_tokens = int(grid.prod()) // (m * m)
    if n_tokens + 2 > batch["cu_seqlens"][1]:  # the image must fit in the first document
        return batch
    ids = batch["input_ids"]
    ids[0, 0] = v.vision_start_token_id
    ids[0, 1:1 + n_tokens] = v.image_token_id
    ids[0, 1 + n_tokens] = v.vision_end_token_id
    labels = batch["labels"]
    labels[0, :-1] = ids[0, 1:].clone() if labels.shape[1] > 1 else labels[0, :-1]
    batch["pixel_values"] = torch.zeros(int(grid.prod()), v.patch_dim)
    batch["image_grid_thw"] = grid
    batch["position_ids"] = None  # M-RoPE positions from the tokens and the grid
    return batch


def rehearse(overrides: list[str], world_size: int, rank: int = 0) -> RehearsalReport:
    """Build, shard, materialise (fake) and run one step as rank `rank` of `world_size`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model.language_model import Qwen35LM
    from parallel.materialize import materialize
    from parallel.layout import pipeline_microbatches
    from parallel.mesh import build_meshes, validate_layout
    from parallel.plan import parallelize
    from train.fp8_policy import apply_precision, fp8_amax_group
    from train.main import load_config
    from train.optim import build_optimizer
    from train.precision import autocast

    t_start = time.perf_counter()
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # what the config checks resolve dp_shard=-1 from
    try:
        cfg = load_config(overrides)
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved
    layout = validate_layout(cfg.parallel, cfg.model, world_size, cfg.data.seq_len,
                             grad_accum=cfg.train.grad_accum)
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    device = torch.device("cpu")
    gpu = torch.device("cuda")  # what `auto` precision resolves to on the cluster
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "auto": torch.bfloat16}[cfg.train.autocast]
    fake = _fake_mode()
    from model.ops import gated_delta_chunk

    # The torch chunked delta rule keeps its intra-chunk factors for backward on CPU only; on the
    # GPU it recomputes them (fla's kernels do too): count the GPU's activations.
    recompute = gated_delta_chunk.RECOMPUTE_IN_BACKWARD
    gated_delta_chunk.RECOMPUTE_IN_BACKWARD = True
    try:
        meshes = build_meshes(layout, "cpu")
        torch.manual_seed(cfg.train.seed)
        with torch.device("meta"):
            model = Qwen35LM(cfg.model)
        fp8, _ = apply_precision(model, cfg.precision, gpu, fp8_amax_group(meshes), cfg.parallel.ep)
        if fp8 is not None:
            raise ValueError(f"precision.backend={cfg.precision.backend}: the rehearsal runs without FP8")
        # The trainer's path: the plans in parallelize's order, then this rank's shards
        # materialised and initialised (on fake tensors: shapes, no memory).
        runner = parallelize(model, meshes, cfg.parallel, gpu,
                             num_microbatches=pipeline_microbatches(cfg.parallel, cfg.train.grad_accum))
        runner.device = device  # the plans resolved `auto` for the GPU; the step runs on fake CPU
        runner.set_forward_context(lambda: autocast(device, amp_dtype))
        model = runner.model
        with fake:
            materialize(model, device, cfg.train.seed, values=False)
        params = list(model.parameters())
        params_numel = sum(_local(p).numel() for p in params)
        params_bytes = tensor_bytes(params)
        build_s = time.perf_counter() - t_start

        t_step = time.perf_counter()
        batches = [synthetic_batch(cfg, meshes.dp_rank * cfg.train.grad_accum + i)
                   for i in range(cfg.train.grad_accum)]
        total_tokens = meshes.dp_size * sum(b["num_tokens"] for b in batches)
        with fake, LiveBytes(params, model.buffers()) as mem, _static_pipeline_votes():
            optimizer = build_optimizer(model, cfg.train, fused=True)  # as on the GPU
            mem.mark("forward and backward")
            runner.forward_backward(batches, total_tokens)
            fwd_bwd_peak = mem.peak
            grads_bytes = tensor_bytes(grads(params))
            mem.mark("optimizer")
            runner.finish_grads([p for p in params if p.grad is not None])
            optimizer.step()
            optimizer_bytes = tensor_bytes(t for t in optimizer_tensors(optimizer) if t.dim() > 0)
            # Steady state: from the second step on, the optimizer's state is alive through the
            # forward and backward too (the first step creates it at its end).
            peak = max(fwd_bwd_peak + optimizer_bytes, mem.peak)
        step_s = time.perf_counter() - t_step
    finally:
        gated_delta_chunk.RECOMPUTE_IN_BACKWARD = recompute
        dist.destroy_process_group()
    wall = time.perf_counter() - t_start
    return RehearsalReport(
        model=cfg.model.name, layout=_layout_line(layout), world_size=world_size, rank=rank,
        batch=[cfg.data.batch_size, cfg.data.seq_len], params_numel=params_numel,
        params_bytes=params_bytes, grads_bytes=grads_bytes, optimizer_bytes=optimizer_bytes,
        activations_peak_bytes=peak - params_bytes - grads_bytes - optimizer_bytes, peak_bytes=peak,
        images=sum(0 if b.get("image_grid_thw") is None else len(b["image_grid_thw"]) for b in batches),
        wall_s=wall, build_s=build_s, step_s=step_s,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


@contextlib.contextmanager
def _static_pipeline_votes():
    """torch.distributed.pipelining's stages vote at their first step, over point-to-point sends,
    on whether their static shapes suffice or shapes must be inferred by exchanging pickled
    metadata. A fake group delivers neither. parallel/pipeline.py gives every stage its input and
    output shapes (plain tensors), so on a real group the vote is always "static": cast that vote."""
    from torch.distributed.pipelining.stage import PipelineStage

    vote = lambda self, *args, **kwargs: torch.ones(1, dtype=torch.int32)  # noqa: E731
    saved = PipelineStage._warmup_forward_vote, PipelineStage._warmup_backward_result
    PipelineStage._warmup_forward_vote = PipelineStage._warmup_backward_result = vote
    try:
        yield
    finally:
        PipelineStage._warmup_forward_vote, PipelineStage._warmup_backward_result = saved


def _layout_line(layout) -> str:
    names = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")
    return " ".join(f"{n}={getattr(layout, n)}" for n in names)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parallel.rehearse", description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--suggest", action="store_true",
                   help="list the layouts of --world-size GPUs that fit --gpu-mem-gib (parallel/suggest.py)")
    p.add_argument("--gpu-mem-gib", type=float, default=141.0)
    args, overrides = p.parse_known_args(argv)
    if args.suggest:
        from parallel import suggest

        return suggest.main([*overrides, "--world-size", str(args.world_size),
                             "--gpu-mem-gib", str(args.gpu_mem_gib)])
    report = rehearse(overrides, args.world_size, args.rank)
    print(json.dumps(asdict(report)) if args.json else report.lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
