"""Expert parallelism on gloo: every rank holds the same MoE weights and its own tokens; outputs,
aux losses and gradients must equal one process running the unsharded block on every rank's tokens.

Each spawned worker runs several checks, so that the process start-up is paid once per world size.
"""

from __future__ import annotations

import copy
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

from model.config import load_model_config
from model.context import SequenceContext
from model.moe import LocalTokenDispatcher, SparseMoE
from parallel.expert_parallel import (AllToAllTokenDispatcher, apply_expert_parallel,
                                      collect_comm_bytes, collect_dropped_tokens)
from tests.distributed import run_ranks

# fp32: a few ulps at O(1) values; gradient sums run in a different order across ranks.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
AUX, Z = 0.3, 0.1        # loss weights of the aux and z losses, so that the router sees them


def _with_ep_mesh(rank: int, world: int, worker, *args) -> None:
    worker(rank, world, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), *args)


def _run(worker, world: int, *args) -> None:
    run_ranks(world, _with_ep_mesh, worker, *args, timeout_s=60)


def _ctx() -> SequenceContext:
    return SequenceContext(None, None, None, None, None)   # SparseMoE only collects aux losses


def _moe(dtype, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(load_model_config("tiny"))
    for p in moe.parameters():
        nn.init.normal_(p, std=0.2)
    return moe.to(dtype)


def _inputs(world: int, dtype, d: int, seed: int = 1):
    """Per rank r: tokens x_r [2, 5 + r, D] (ranks differ in count too) and output weights w_r."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 5 + r, d, generator=g, dtype=dtype) for r in range(world)]
    ws = [torch.randn(x.shape, generator=g, dtype=dtype) for x in xs]
    return xs, ws


def _loss(moe, x, w):
    ctx = _ctx()
    out = moe(x, ctx)
    aux, z = ctx.aux_losses["moe_aux"], ctx.aux_losses["moe_z"]
    return (out * w).sum() + AUX * aux + Z * z, out, aux, z


def _reference(ref: SparseMoE, xs, ws, rank: int, forward=None):
    """Backprops sum_r L_r through `ref` (or `forward(ref, x)`); returns rank's (out, aux, z)."""
    total, mine = 0.0, None
    for r, (x, w) in enumerate(zip(xs, ws)):
        if forward is None:
            loss, out, aux, z = _loss(ref, x, w)
        else:
            out = forward(ref, x)
            loss, aux, z = (out * w).sum(), None, None
        total = total + loss
        if r == rank:
            mine = (out.detach(), aux, z)
    total.backward()
    return mine


def _check_grads(ep: SparseMoE, ref: SparseMoE, rank: int, tol: float) -> None:
    """Local expert shards equal the reference's rows of those experts; every other gradient,
    summed over ranks, equals the reference's (each rank holds only its own tokens' term)."""
    ref_grads = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        ref_grad = ref_grads[name].grad
        if name in ("experts.gate_up_proj", "experts.down_proj"):
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), name
            assert p.shape == ref_grad.shape and p.placements == (Shard(0),)
            local = p.grad.to_local()
            n = local.shape[0]
            assert_close(local, ref_grad[rank * n:(rank + 1) * n], rtol=tol, atol=tol, msg=name)
        else:
            g = p.grad.clone()
            dist.all_reduce(g)
            assert_close(g, ref_grad, rtol=tol, atol=tol, msg=name)


def _routed_idx(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return moe.gate(x.reshape(-1, x.shape[-1]))[2]


def _dropless_worker(rank: int, world: int, mesh, dtype) -> None:
    tol = TOL[dtype]
    ref = _moe(dtype)
    ep = apply_expert_parallel(copy.deepcopy(ref), mesh)
    assert isinstance(ep.dispatcher, AllToAllTokenDispatcher)
    assert {k: v.shape for k, v in ep.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    xs, ws = _inputs(world, dtype, ref.experts.gate_up_proj.shape[-1])

    x = xs[rank].clone().requires_grad_()
    loss, out, aux, z = _loss(ep, x, ws[rank])
    loss.backward()
    for x_r in xs:
        x_r.requires_grad_()
    ref_out, ref_aux, ref_z = _reference(ref, xs, ws, rank)
    assert_close(out, ref_out, rtol=tol, atol=tol)
    assert_close(x.grad, xs[rank].grad, rtol=tol, atol=tol)
    assert_close(aux, ref_aux, rtol=tol, atol=tol)
    assert_close(z, ref_z, rtol=tol, atol=tol)
    _check_grads(ep, ref, rank, tol)
    # The local views live only during the experts' forward.
    assert "gate_up_proj" not in ep.experts.__dict__ and isinstance(ep.experts.gate_up_proj, DTensor)

    e = ref.num_experts
    nl = e // world
    idx = [_routed_idx(ref, x) for x in xs]
    counts = torch.stack([torch.bincount(i.flatten(), minlength=e) for i in idx])     # [src, E]
    mine = slice(rank * nl, (rank + 1) * nl)
    assert torch.equal(ep.dispatcher.tokens_per_local_expert, counts[:, mine].sum(0))
    assert collect_dropped_tokens(ep).tolist() == [0]

    # Bytes: dispatch and combine, forward and backward (x needs a grad here), each move S rows
    # one way and R rows the other.
    d = xs[0].shape[-1]
    row = d * xs[0].element_size()
    sent = int(counts[rank].sum() - counts[rank, mine].sum())
    received = int(counts[:, mine].sum() - counts[rank, mine].sum())
    assert collect_comm_bytes(ep) == {
        "tokens_sent": 2 * (sent + received) * row, "tokens_received": 2 * (sent + received) * row,
        "tokens_local": 4 * int(counts[rank, mine].sum()) * row,
        "counts_sent": (world - 1) * nl * 8, "counts_received": (world - 1) * nl * 8}
    assert collect_comm_bytes(ep)["tokens_sent"] == 0


def _with_drops(moe: SparseMoE, x: torch.Tensor, capacity_factor: float):
    """Single-process definition of the capacity: per expert, copies past ceil(c * N * k / E) in
    token order contribute zero. Returns (out, number of dropped copies)."""
    x2 = x.reshape(-1, x.shape[-1])
    _, _, idx, weights = moe.gate(x2)
    n, k = idx.shape
    local = LocalTokenDispatcher(moe.num_experts)
    x_sorted, counts = local.dispatch(x2, idx)
    capacity = math.ceil(capacity_factor * n * k / moe.num_experts)
    pos = torch.arange(n * k) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    y = moe.experts(x_sorted, counts) * (pos < capacity).unsqueeze(1).to(x.dtype)
    out = local.combine(y, weights) + torch.sigmoid(moe.shared_expert_gate(x2)) * moe.shared_expert(x2)
    return out.view(x.shape), int((pos >= capacity).sum())


def _capacity_worker(rank: int, world: int, mesh) -> None:
    dtype, tol = torch.float64, TOL[torch.float64]
    ref = _moe(dtype)
    xs, ws = _inputs(world, dtype, ref.experts.gate_up_proj.shape[-1])
    c = 0.5        # capacity ceil(N / 8) < the 2N / 8 copies an expert gets on average: drops certain

    ep = apply_expert_parallel(copy.deepcopy(ref), mesh, capacity_factor=c)
    # Under activation checkpointing (as parallel/activation_checkpoint.py wraps decoder layers):
    # the recompute in backward repeats the exchange but must not count the drops twice.
    out = checkpoint(ep, xs[rank], _ctx(), use_reentrant=False)
    (out * ws[rank]).sum().backward()
    out = ep(xs[rank], _ctx()).detach()
    expected, dropped = _with_drops(ref, xs[rank], c)
    assert_close(out, expected.detach(), rtol=tol, atol=tol)
    assert dropped > 0 and collect_dropped_tokens(ep).tolist() == [2 * dropped]   # two forwards
    assert collect_dropped_tokens(ep).tolist() == [0]
    ref.zero_grad()
    _reference(ref, xs, ws, rank, forward=lambda m, x: _with_drops(m, x, c)[0])
    _check_grads(ep, ref, rank, tol)

    # A factor that cannot bind (capacity = N * k) equals dropless.
    big = apply_expert_parallel(copy.deepcopy(ref), mesh, capacity_factor=float(ref.num_experts))
    assert_close(big(xs[rank], _ctx()), ref(xs[rank], _ctx()), rtol=tol, atol=tol)
    assert collect_dropped_tokens(big).tolist() == [0]


def _uneven_worker(rank: int, world: int, mesh) -> None:
    """Every token picks the last two experts (both on the last rank): the other ranks receive no
    rows and every rank sends nothing to them."""
    dtype, tol = torch.float64, TOL[torch.float64]
    ref = _moe(dtype)
    e = ref.num_experts
    with torch.no_grad():
        ref.gate.weight.mul_(0.05)
        ref.gate.weight[e - 1, 0], ref.gate.weight[e - 2, 0] = 4.0, 3.0
    xs, ws = _inputs(world, dtype, ref.experts.gate_up_proj.shape[-1], seed=2)
    for x in xs:
        x[..., 0] = 4.0 + x[..., 0].abs()
    for x in xs:
        assert set(_routed_idx(ref, x).flatten().tolist()) == {e - 2, e - 1}
    ep = apply_expert_parallel(copy.deepcopy(ref), mesh)
    loss, out, aux, _ = _loss(ep, xs[rank], ws[rank])
    loss.backward()
    ref_out, ref_aux, _ = _reference(ref, xs, ws, rank)
    assert_close(out, ref_out, rtol=tol, atol=tol)
    assert_close(aux, ref_aux, rtol=tol, atol=tol)
    _check_grads(ep, ref, rank, tol)
    nl = e // world
    total = sum(2 * x.shape[0] * x.shape[1] for x in xs) // 2     # k=2: one copy each per expert
    expected = [0] * nl if rank < world - 1 else [0] * (nl - 2) + [total, total]
    assert ep.dispatcher.tokens_per_local_expert.tolist() == expected
    if rank < world - 1:
        assert ep.experts.down_proj.grad.to_local().abs().max() == 0


def _model_worker(rank: int, world: int, mesh) -> None:
    """The whole tiny language model (4 MoE layers): per-rank losses and gradients."""
    from model.language_model import Qwen35LM

    torch.manual_seed(0)
    ref = Qwen35LM(load_model_config("tiny")).to(torch.float64)
    ep = apply_expert_parallel(copy.deepcopy(ref), mesh)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, ref.cfg.vocab_size, (1, 8 + 2 * r), generator=g) for r in range(world)]
    out = ep(ids[rank][:, :-1], labels=ids[rank][:, 1:])
    out.loss.backward()
    total = 0.0
    for r, i in enumerate(ids):
        o = ref(i[:, :-1], labels=i[:, 1:])
        total = total + o.loss
        if r == rank:
            assert_close(out.loss, o.loss, rtol=1e-11, atol=1e-11)
            assert_close(out.moe_aux, o.moe_aux, rtol=1e-11, atol=1e-11)
    total.backward()
    ref_grads = dict(ref.named_parameters())
    nl = ref.cfg.num_experts // world
    for name, p in ep.named_parameters():
        if isinstance(p, DTensor):
            grad = p.grad.to_local()
            ref_grad = ref_grads[name].grad[rank * nl:(rank + 1) * nl]
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad)
            ref_grad = ref_grads[name].grad
        assert_close(grad, ref_grad, rtol=1e-10, atol=1e-11, msg=name)
    assert sum(isinstance(p, DTensor) for p in ep.parameters()) == 2 * ref.num_moe_layers


def _all_2rank_checks(rank: int, world: int, mesh) -> None:
    for dtype in (torch.float64, torch.float32):
        _dropless_worker(rank, world, mesh, dtype)
    _capacity_worker(rank, world, mesh)
    _uneven_worker(rank, world, mesh)
    _model_worker(rank, world, mesh)
    _named_failure_worker(rank, world, mesh)


def _named_failure_worker(rank: int, world: int, mesh) -> None:
    """A collective that never completes (rank 1 skips the dispatch) fails naming itself."""
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=1))
    if rank == 0:
        d = AllToAllTokenDispatcher(8, group, name="layers.5.mlp")
        with pytest.raises(RuntimeError, match=r"ep all_to_all counts \(layers.5.mlp\)"):
            d.dispatch(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))
    dist.barrier()


def _all_4rank_checks(rank: int, world: int, mesh) -> None:
    _dropless_worker(rank, world, mesh, torch.float64)
    _uneven_worker(rank, world, mesh)


def test_expert_parallel_2_ranks():
    _run(_all_2rank_checks, 2)


def test_expert_parallel_4_ranks():
    _run(_all_4rank_checks, 4)


def test_ep_size_must_divide_experts(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide model.num_experts=8"):
        AllToAllTokenDispatcher(8, ep_group=None)
    with pytest.raises(ValueError, match=r"expert_capacity_factor=0"):
        AllToAllTokenDispatcher(6, ep_group=None, capacity_factor=0)
