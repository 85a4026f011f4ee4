"""Activation checkpointing on an MoE model: no memory growth over steps, and the same losses,
gradients and routing counts as without it (the recompute in backward has no side effects)."""

import dataclasses
import gc

import pytest
import torch

from model.language_model import Qwen35LM
from model.moe import collect_expert_load
from parallel.activation_checkpoint import apply_activation_checkpoint


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from a second thread; on a busy machine two are ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(cfg, ac: str, dtype=torch.float32, **overrides) -> Qwen35LM:
    """Two MoE layers of the tiny config: Gated DeltaNet, then gated attention."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, num_layers=2, full_attention_interval=2, **overrides)
    m = Qwen35LM(cfg).to(dtype)
    apply_activation_checkpoint(m.layers, ac)
    return m


def _live_tensor_bytes() -> int:
    """Bytes of the distinct storages of all tensors Python can still reach, after a full collection."""
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if type(o) is torch.Tensor or type(o) is torch.nn.Parameter:
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("backward", [True, False], ids=["train", "forward-only"])
def test_memory_stays_flat_over_steps(tiny_cfg, backward):
    """20 steps (or 20 forwards with grad and no backward, as a skipped step does): the tensors
    alive after a step are the same bytes as after the first. Before the fix each step leaked the
    checkpointed layers' inputs, context and recomputed activations (~0.5 MiB/step here) through a
    cycle Python's gc cannot see: ctx -> z-loss sum (unweighted, so never backpropagated) -> its
    graph -> checkpoint pack hooks -> checkpoint frame -> the layer's arguments -> ctx."""
    m = _model(tiny_cfg, "full")
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 16))

    def step():
        out = m(ids, labels=ids)
        if backward:
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    first = _live_tensor_bytes()
    for _ in range(19):
        step()
    grown = _live_tensor_bytes() - first
    assert grown <= 64 * 1024, f"{grown / 2**20:.2f} MiB more live tensors after 19 more steps"


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_checkpoint_matches_no_checkpoint(tiny_cfg, monkeypatch, ac):
    """fp64, z-loss and MTP on: equal losses, gradients and expert loads over 2 SGD steps; the
    recompute adds nothing to the forward's aux-loss sums."""
    kw = dict(dtype=torch.float64, router_z_loss_coef=0.01, mtp_num_layers=1)
    plain, ckpt = _model(tiny_cfg, "none", **kw), _model(tiny_cfg, ac, **kw)
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 16))
    contexts, build = [], Qwen35LM.build_context

    def keep_context(self, *args, **kwargs):
        contexts.append(build(self, *args, **kwargs))
        return contexts[-1]

    monkeypatch.setattr(Qwen35LM, "build_context", keep_context)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, ckpt)]
    for _ in range(2):
        outs = []
        for m in (plain, ckpt):
            out = m(ids, labels=ids)
            sums = dict(contexts[-1].aux_losses)
            out.loss.backward()
            outs.append(out)
            after = contexts[-1].aux_losses
            assert after.keys() == sums.keys() and all(after[k] is v for k, v in sums.items()), \
                "the backward's recompute added to the aux-loss sums"
        for name in ("loss", "ce", "mtp_ce", "moe_aux", "moe_z"):
            assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            assert torch.equal(p.grad, q.grad), name
        assert torch.equal(collect_expert_load(plain), collect_expert_load(ckpt))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
