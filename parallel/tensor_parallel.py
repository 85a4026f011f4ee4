"""The language model's tensor-parallel plan, always with sequence parallelism (as torchtitan).

Between tensor-parallel regions the residual stream is a DTensor sharded along the sequence
(`Shard(1)`), and the norms there run on the local slice (`SequenceParallel`). Per decoder layer:

- mixers (gated attention, Gated DeltaNet): the input is all-gathered along the sequence, every
  projection into heads is sharded by head (attention q/k/v heads, with the KV heads replicated when
  the ranks outnumber them, as Megatron does; DeltaNet q/k/v/z/b/a projections,
  their depthwise conv channels, A_log and dt_bias), so attention and the delta rule run locally on
  this rank's heads; the output projection is row-parallel and reduce-scatters back to `Shard(1)`.
  Norms shared by all heads (q/k norm, the gated norm) keep a replicated weight whose gradient is
  summed over the ranks. The math runs on plain local tensors (`LocalCompute`).
- dense SwiGLU MLPs: column-parallel gate/up, row-parallel down (Megatron's split).
- MoE blocks run on the all-gathered sequence and keep their own slice of the output: the shared
  expert is column/row-parallel like a dense MLP (all-reduced back to the full sequence); the router
  and the routed experts are not TP-sharded but run identically on every TP rank (experts are
  spread by expert parallelism instead, over the data-parallel ranks).
- the embedding and LM head are split by vocabulary; the loss is a vocab-parallel cross-entropy that
  never gathers the full logits. The embedding's output is replicated (visual tokens are scattered
  into it), and the stack's output is all-gathered for the final norm, the LM head and MTP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               PrepareModuleInputOutput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from model.attention import GatedAttention
from model.gated_deltanet import GatedDeltaNet
from model.language_model import Qwen35LM
from model.loss import IGNORE_INDEX
from parallel import collectives
from parallel.local_params import LocalCompute
from parallel.spec import QWEN35_SPEC, ModuleSpec, head_params, param_placement, tp_role


def apply_tensor_parallel(model: Qwen35LM, tp_mesh: DeviceMesh,
                          spec: tuple[ModuleSpec, ...] = QWEN35_SPEC) -> Qwen35LM:
    """Shard `model` in place over `tp_mesh` (1-D) by the TP roles of `spec`, parents before
    children (a container's input hook runs before its linears'). Works on a meta-built model."""
    tp = tp_mesh.size()
    tied = model.lm_head.weight is model.embed_tokens.weight
    for name, module in list(model.named_modules()):
        role = tp_role(name, module, spec)
        if role is None:
            continue
        parallelize_module(module, tp_mesh, _style(role, head_params(name, module, spec), module, tp_mesh))
    if tied:  # both are Shard(0) over the vocabulary: one parameter again
        model.lm_head.weight = model.embed_tokens.weight
    vocab_local = model.cfg.vocab_size // tp
    model.token_ce = VocabParallelCrossEntropy(tp_mesh.get_group(), tp_mesh.get_local_rank() * vocab_local)
    # The stack takes the replicated embeddings and hands back the full sequence.
    stack_boundaries(model.layers[0], model.layers[-1], tp_mesh, first=True, last=True)
    return model


def stack_boundaries(first_layer: nn.Module, last_layer: nn.Module, tp_mesh: DeviceMesh,
                     first: bool, last: bool) -> None:
    """Between TP regions the stream is sequence-sharded; outside the decoder stack (or a pipeline
    stage's part of it) it is the full sequence: the first layer shards its input, the last
    all-gathers its output."""
    if first:
        parallelize_module(first_layer, tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(), None), desired_input_layouts=(Shard(1), None)))
    if last:
        parallelize_module(last_layer, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))


def _style(role: str, params: dict, module: nn.Module, tp_mesh: DeviceMesh):
    """The torch ParallelStyle of one TP role (see parallel/spec.py TP_ROLES)."""
    if role == "column":
        return ColwiseParallel()
    if role == "row":  # back to the sequence shard, kept a DTensor for the residual add
        return RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
    if role == "row_replicate":
        return RowwiseParallel(output_layouts=Replicate())
    if role == "sequence":
        return SequenceParallel()
    if role == "vocab_embed":  # replicated output: visual tokens are scattered into it
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate(),
                               use_local_output=True)
    if role == "vocab_head":  # the logits stay split by vocabulary for the vocab-parallel CE
        return ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                               use_local_output=True)
    if role == "gather_input":
        return PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None))
    if role == "moe_input":  # the router and routed experts run the whole sequence on every rank
        return PrepareModuleInputOutput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
            use_local_input=True, output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
            use_local_output=False)
    if role == "replicated_input":
        # Megatron's split on the gathered sequence: one all-reduce forward (the row-parallel
        # output) and one backward (the input's gradient, once for gate and up together).
        return PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
    if role == "heads":
        return LocalCompute(_head_placements(module, params, tp_mesh),
                            input_layouts=(Replicate(), None), partial_input_grad=True)
    raise ValueError(f"no ParallelStyle for TP role {role!r}")


def _head_placements(mixer: nn.Module, params: dict, tp_mesh: DeviceMesh) -> dict:
    """Each parameter's placement under the `heads` role, and the mixer's per-rank head counts.
    More ranks than KV heads: each rank computes them all and keeps the one it needs (Megatron
    replicates KV heads the same way); their weight grads are summed."""
    tp = tp_mesh.size()
    out = {}
    for pname in params:
        placement = param_placement(pname, "heads", params, tp, getattr(mixer, "num_kv_heads", 0))
        out[pname] = Shard(0) if placement == "shard0" else Partial()
    if isinstance(mixer, GatedAttention):
        kv = mixer.num_kv_heads
        if tp <= kv:
            mixer.num_kv_heads //= tp
        else:
            head = tp_mesh.get_local_rank() // (tp // kv)
            mixer.kv_heads = slice(head, head + 1)
            mixer.num_kv_heads = 1
        mixer.num_heads //= tp
    elif isinstance(mixer, GatedDeltaNet):
        mixer.num_k_heads //= tp
        mixer.num_v_heads //= tp
        mixer.key_dim //= tp
        mixer.value_dim //= tp
    else:
        raise TypeError(f"no tensor-parallel head split for mixer {type(mixer).__name__}")
    return out


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group. Backward is the identity: every rank computes the same loss from the
    sum, so each rank's gradient of it is already the gradient of its own term."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, name: str) -> torch.Tensor:
        return collectives.all_reduce(x.clone(), name, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class VocabParallelCrossEntropy(nn.Module):
    """Per-token CE from vocab-sharded logits (Megatron's): logits [B, T, V/tp] holding vocabulary
    ids [vocab_start, vocab_start + V/tp), labels [B, T] -> CE [B, T] (fp32, equal on all ranks,
    0 where ignored). Exchanges three [B, T] tensors (max, sum of exp, target logit), never [B, T, V]."""

    def __init__(self, group, vocab_start: int):
        super().__init__()
        self.group = group
        self.vocab_start = vocab_start

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
        with torch.no_grad():
            m = x.max(dim=-1).values
            collectives.all_reduce(m, "tp all_reduce vocab-parallel CE max", self.group,
                                   op=dist.ReduceOp.MAX)
        shifted = x - m.unsqueeze(-1)
        sum_exp = _AllReduceSum.apply(shifted.exp().sum(dim=-1), self.group,
                                      "tp all_reduce vocab-parallel CE sum of exp")
        local = labels - self.vocab_start
        mine = (local >= 0) & (local < x.shape[-1])
        picked = shifted.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        target = _AllReduceSum.apply(torch.where(mine, picked, torch.zeros_like(picked)), self.group,
                                     "tp all_reduce vocab-parallel CE target logit")
        ce = sum_exp.log() - target
        return torch.where(labels == IGNORE_INDEX, torch.zeros_like(ce), ce)
