"""Initialisation that does not depend on the layout: every initial weight is a function of
(seed, parameter name, global element index) only.

A counter-based generator (SplitMix64 on int64 tensors) hashes the global flat index of an element
with a per-parameter key, so any block of a parameter (a TP shard, an FSDP shard, an expert slice, a
pipeline stage's layers) is computed on its own, without drawing the rest: every layout gets the
same weights, with no seed checkpoint. The ops are plain tensor ops (no `.item()`), so the same code
runs on any device and under the meta device or FakeTensorMode.

    rules = param_rules(model)                         # {parameter name: Rule}, from the owners
    w = init_region(rules[name], seed, name, global_shape, [rows, cols], torch.bfloat16, "cuda")

`Qwen35LM.init_weights(seed)` fills a whole (unsharded) model this way; `parallel/materialize.py`
fills each rank's shards of a sharded one.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from model.gated_deltanet import GatedDeltaNet
from model.moe import GroupedExperts, TopKRouter
from model.norm import GatedRMSNorm, RMSNorm
from model.rope import RotaryEmbedding
from model.vision import VisionRotary

# Elements per temporary index tensor (int64: 128 MiB, plus the float64 draws of the same size).
SLAB = 1 << 24


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


GAMMA = _i64(0x9E3779B97F4A7C15)  # SplitMix64's increment (odd: index -> state is a bijection)
MUL1 = _i64(0xBF58476D1CE4E5B9)
MUL2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask off the copied sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplies wrap mod 2^64, as in C's uint64)."""
    z = (z ^ _shr(z, 30)) * MUL1
    z = (z ^ _shr(z, 27)) * MUL2
    return z ^ _shr(z, 31)


def stream_key(seed: int, name: str) -> int:
    """The per-parameter key (int64): a hash of the seed and the parameter's name, host-side."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return _i64(int.from_bytes(digest, "little"))


def random_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """64 random bits (int64) per element of `index` (int64 global flat indices, any shape):
    the index-th output of SplitMix64 seeded with `key`."""
    return mix64(index * GAMMA + key)


def uniform01(bits: torch.Tensor) -> torch.Tensor:
    """bits (int64) -> float64 uniform in [0, 1), 53 bits."""
    return _shr(bits, 11).to(torch.float64) * 2.0 ** -53


def standard_normal(bits: torch.Tensor) -> torch.Tensor:
    """bits (int64) -> float64 N(0, 1) by Box-Muller on the two 32-bit halves (|z| <= 6.1)."""
    u1 = (_shr(bits, 32).to(torch.float64) + 0.5) * 2.0 ** -32  # in (0, 1): log is finite
    u2 = (bits & 0xFFFFFFFF).to(torch.float64) * 2.0 ** -32
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _fp32(x: float) -> float:
    """x rounded to float32 (constants go through fp32, like computed values)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class Rule:
    """How one parameter is initialised. kind: "normal" (mean a, std b), "uniform" (low a, high b),
    "log_uniform" (log of U(a, b)) or "constant" (a)."""

    kind: str
    a: float = 0.0
    b: float = 0.0

    def sample(self, key: int, index: torch.Tensor) -> torch.Tensor:
        """index: int64 global flat indices, any shape -> float32 values of that shape.
        The draw and the affine map run in float64, rounded once to float32: the transcendental
        functions' last-ulp differences between devices vanish in that rounding (almost always)."""
        if self.kind == "constant":
            return torch.full(index.shape, _fp32(self.a), dtype=torch.float32, device=index.device)
        bits = random_bits(key, index)
        if self.kind == "normal":
            x = standard_normal(bits) * self.b + self.a
        elif self.kind == "uniform":
            x = uniform01(bits) * (self.b - self.a) + self.a
        elif self.kind == "log_uniform":
            x = torch.log(uniform01(bits) * (self.b - self.a) + self.a)
        else:
            raise ValueError(f"unknown init rule kind {self.kind!r}")
        return x.to(torch.float32)


def normal(std: float) -> Rule:
    return Rule("normal", 0.0, std)


ZEROS, ONES = Rule("constant", 0.0), Rule("constant", 1.0)


def _strides(shape: Sequence[int]) -> list[int]:
    out, s = [], 1
    for n in reversed(shape):
        out.append(s)
        s *= n
    return out[::-1]


def _flat_index(index_per_dim: list[torch.Tensor], strides: list[int], base: torch.Tensor) -> torch.Tensor:
    """Outer sum of index_per_dim[d] * strides[d] + base -> [len(i0), len(i1), ...] int64."""
    flat = base
    nd = len(index_per_dim)
    for d, (idx, s) in enumerate(zip(index_per_dim, strides)):
        flat = flat + (idx * s).view([-1 if e == d else 1 for e in range(nd)])
    return flat


def _fill(out: torch.Tensor, rule: Rule, key: int, strides: list[int],
          index_per_dim: list[torch.Tensor], base: torch.Tensor) -> None:
    """Fill `out` (shape: the index vectors' lengths) in slabs along dim 0 of at most SLAB elements;
    rows larger than a slab recurse into dim 1."""
    if out.dim() == 0:
        out.copy_(rule.sample(key, base))
        return
    inner = math.prod(len(i) for i in index_per_dim[1:])
    if inner > SLAB:
        for r in range(out.shape[0]):
            _fill(out[r], rule, key, strides[1:], index_per_dim[1:],
                  base + index_per_dim[0][r] * strides[0])
        return
    rows = max(1, SLAB // max(inner, 1))
    for start in range(0, out.shape[0], rows):
        sub = [index_per_dim[0][start:start + rows], *index_per_dim[1:]]
        out[start:start + rows].copy_(rule.sample(key, _flat_index(sub, strides, base)))


@torch.no_grad()
def fill_region_(out: torch.Tensor, rule: Rule, seed: int, name: str, global_shape: Sequence[int],
                 index_per_dim: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fill `out` in place with the block of parameter `name` (global shape `global_shape`) whose
    global indices along dim d are `index_per_dim[d]` (int64 on out's device, any order, e.g. a
    strided shard's). out: [len(index_per_dim[0]), ...], any dtype (values are cast from fp32)."""
    shape = tuple(len(i) for i in index_per_dim)
    if len(global_shape) != len(index_per_dim) or tuple(out.shape) != shape:
        raise ValueError(f"{name}: out {tuple(out.shape)} is not the region {shape} of a "
                         f"{tuple(global_shape)} parameter")
    if out.numel() == 0:
        return out
    base = torch.zeros((), dtype=torch.int64, device=out.device)
    _fill(out, rule, stream_key(seed, name), _strides(global_shape), list(index_per_dim), base)
    return out


def init_region(rule: Rule, seed: int, name: str, global_shape: Sequence[int],
                index_per_dim: Sequence[torch.Tensor], dtype: torch.dtype,
                device: torch.device | str) -> torch.Tensor:
    """The values of the block of `name` given by the global index vectors, as a new tensor
    [len(index_per_dim[0]), ...] of `dtype` on `device`."""
    index_per_dim = [i.to(device=device, dtype=torch.int64) for i in index_per_dim]
    out = torch.empty([len(i) for i in index_per_dim], dtype=dtype, device=device)
    return fill_region_(out, rule, seed, name, global_shape, index_per_dim)


def full_index(shape: Sequence[int], device) -> list[torch.Tensor]:
    """The index vectors of a whole tensor: [arange(n) for n in shape]."""
    return [torch.arange(n, dtype=torch.int64, device=device) for n in shape]


def module_rules(m: nn.Module, std: float) -> dict[str, Rule]:
    """The rules of the parameters `m` owns directly (recurse=False), by the owner's type: the
    project's init before layout independence (Qwen35LM.init_weights and reset_parameters)."""
    if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv3d)):
        return {"weight": normal(std), "bias": ZEROS}
    if isinstance(m, nn.Conv1d):
        # The DeltaNet's depthwise convs keep PyTorch's default, kaiming_uniform(a=sqrt(5)):
        # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in_channels/groups * kernel.
        fan_in = math.prod(m.weight.shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        return {"weight": Rule("uniform", -bound, bound), "bias": Rule("uniform", -bound, bound)}
    if isinstance(m, GroupedExperts):
        return {"gate_up_proj": normal(std), "down_proj": normal(std)}
    if isinstance(m, TopKRouter):
        return {"weight": normal(std)}
    if isinstance(m, RMSNorm):
        return {"weight": ZEROS}  # zero-centred: the gain is 1 + w
    if isinstance(m, GatedRMSNorm):
        return {"weight": ONES}
    if isinstance(m, nn.LayerNorm):
        return {"weight": ONES, "bias": ZEROS}
    if isinstance(m, GatedDeltaNet):
        # A ~ U(0.01, 16) as in the released Qwen3.5 code (kept in fp32 by the model); dt_bias = 1.
        return {"A_log": Rule("log_uniform", 0.01, 16.0), "dt_bias": ONES}
    return {}


# Wrappers that insert a path segment (activation checkpointing, torch.compile, FSDP1): the
# generator keys on the unparallelised model's names.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def param_rules(model: nn.Module, initializer_range: Optional[float] = None) -> dict[str, Rule]:
    """{name: Rule} for every parameter of `model` as `named_parameters()` names it (tied weights
    once, under their first name). initializer_range: the normal std, default model.cfg's."""
    std = model.cfg.initializer_range if initializer_range is None else initializer_range
    rules = {}
    for name, _ in model.named_parameters():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        rule = module_rules(owner, std).get(attr)
        if rule is None:
            raise ValueError(f"no init rule for parameter {name} of {type(owner).__name__}: "
                             f"add one to model/init.py module_rules")
        rules[name] = rule
    return rules


@torch.no_grad()
def reset_buffers(model: nn.Module) -> None:
    """The non-parameter buffers, from their modules' deterministic rules (after `to_empty`)."""
    for m in model.modules():
        if isinstance(m, (RotaryEmbedding, VisionRotary)):
            m.reset_parameters()
        elif isinstance(m, TopKRouter):
            m.expert_bias.zero_()
            m.tokens_per_expert.zero_()


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A seed from torch's (default) generator: `torch.manual_seed(s)` keeps builds deterministic."""
    return int(torch.randint(0, 1 << 62, (), generator=generator))


@torch.no_grad()
def init_model_(model: nn.Module, seed: int, initializer_range: Optional[float] = None) -> None:
    """Every parameter of an unsharded model (plain tensors) in full, then the buffers."""
    rules = param_rules(model, initializer_range)
    for name, p in model.named_parameters():
        fill_region_(p, rules[name], seed, canonical_name(name), p.shape, full_index(p.shape, p.device))
    reset_buffers(model)
