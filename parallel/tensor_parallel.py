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
from model.mlp import SwiGLU
from model.moe import SparseMoE
from parallel import collectives
from parallel.local_params import LocalCompute


def apply_tensor_parallel(model: Qwen35LM, tp_mesh: DeviceMesh) -> Qwen35LM:
    """Shard `model` in place over `tp_mesh` (1-D). Every rank must hold the same full weights."""
    tp = tp_mesh.size()
    tied = model.lm_head.weight is model.embed_tokens.weight
    parallelize_module(model, tp_mesh, {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate(),
                                        use_local_output=True),
        "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                   use_local_output=True),
    })
    if tied:  # both are Shard(0) over the vocabulary: one parameter again
        model.lm_head.weight = model.embed_tokens.weight
    vocab_local = model.cfg.vocab_size // tp
    model.token_ce = VocabParallelCrossEntropy(tp_mesh.get_group(), tp_mesh.get_local_rank() * vocab_local)

    for layer in model.layers:
        plan = {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel()}
        plan.update(_mixer_plan(layer.mixer, "self_attn" if isinstance(layer.mixer, GatedAttention)
                                else "linear_attn", tp_mesh))
        plan.update(_mlp_plan(layer.mlp))
        parallelize_module(layer, tp_mesh, plan)
    # The stack takes the replicated embeddings and hands back the full sequence.
    parallelize_module(model.layers[0], tp_mesh, PrepareModuleInput(
        input_layouts=(Replicate(), None), desired_input_layouts=(Shard(1), None)))
    parallelize_module(model.layers[-1], tp_mesh, PrepareModuleOutput(
        output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    return model


def _mixer_plan(mixer: nn.Module, name: str, tp_mesh: DeviceMesh) -> dict:
    tp = tp_mesh.size()
    if isinstance(mixer, GatedAttention):
        params = {"q_proj.weight": Shard(0), "q_norm.weight": Partial(), "k_norm.weight": Partial()}
        kv = mixer.num_kv_heads
        if tp <= kv:  # KV heads split like the query heads
            params.update({"k_proj.weight": Shard(0), "v_proj.weight": Shard(0)})
            mixer.num_kv_heads //= tp
        else:  # more ranks than KV heads: each rank computes them all and keeps the one it needs
            # (Megatron replicates KV heads the same way); their weight grads are summed.
            params.update({"k_proj.weight": Partial(), "v_proj.weight": Partial()})
            head = tp_mesh.get_local_rank() // (tp // kv)
            mixer.kv_heads = slice(head, head + 1)
            mixer.num_kv_heads = 1
        mixer.num_heads //= tp
        out = "o_proj"
    elif isinstance(mixer, GatedDeltaNet):
        params = {f"in_proj_{p}.weight": Shard(0) for p in "qkvzba"}
        params.update({f"conv_{p}.weight": Shard(0) for p in "qkv"})
        params.update({"A_log": Shard(0), "dt_bias": Shard(0), "norm.weight": Partial()})
        mixer.num_k_heads //= tp
        mixer.num_v_heads //= tp
        mixer.key_dim //= tp
        mixer.value_dim //= tp
        out = "out_proj"
    else:
        raise TypeError(f"no tensor-parallel plan for mixer {type(mixer).__name__}")
    return {name: LocalCompute(params, input_layouts=(Replicate(), None), partial_input_grad=True),
            f"{name}.{out}": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}


def _mlp_plan(mlp: nn.Module) -> dict:
    if isinstance(mlp, SparseMoE):
        plan = {"mlp": PrepareModuleInputOutput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None),
            use_local_input=True, output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
            use_local_output=False)}
        if mlp.shared_expert is not None:
            # Megatron's split on the gathered sequence: one all-reduce forward (the row-parallel
            # output) and one backward (the input's gradient, once for gate and up together).
            plan.update({
                "mlp.shared_expert": PrepareModuleInput(input_layouts=(Replicate(),),
                                                        desired_input_layouts=(Replicate(),)),
                "mlp.shared_expert.gate_proj": ColwiseParallel(),
                "mlp.shared_expert.up_proj": ColwiseParallel(),
                "mlp.shared_expert.down_proj": RowwiseParallel(output_layouts=Replicate())})
        return plan
    if isinstance(mlp, SwiGLU):
        return {"mlp": PrepareModuleInput(input_layouts=(Shard(1), None),
                                          desired_input_layouts=(Replicate(), None)),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    raise TypeError(f"no tensor-parallel plan for MLP {type(mlp).__name__}")


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
