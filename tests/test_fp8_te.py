"""The Transformer Engine backend's wiring (train/fp8_te.py) on CPU, against a fake
`transformer_engine` with the real API's signatures that computes in plain PyTorch: which modules
are swapped, state-dict keys, outputs and gradients equal to the unswapped model (expert groups
padded, an expert without tokens), also under tensor + sequence parallelism and expert
parallelism with FSDP2 (2 gloo ranks), the recipes built from config, the autocast's amax
reduction group and its delayed-scaling all-reduce (why the vision tower stays BF16 there), the
FP8 state through a DCP checkpoint, activation-checkpointing contexts, and the errors.
What the fake cannot show (TE's kernels, its FP8 numerics) is for benchmarks/gpu_check.py on a
GPU."""

import contextlib
import copy
import dataclasses
import enum
import pickle
import sys
import types
from collections import deque

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn
from torch.distributed.tensor import Shard

from model.config import load_model_config
from model.language_model import Qwen35LM
from model.moe import GroupedExperts
from parallel.config import ParallelConfig
from parallel.grads import match_grad_placements
from parallel.mesh import build_meshes, validate_layout
from train import fp8_te
from train.fp8_config import PrecisionConfig
from train.fp8_policy import apply_precision, precision_table

CPU = torch.device("cpu")
TE = PrecisionConfig(backend="te")
REAL_CHECK_DEVICE = fp8_te.check_device  # the fixture below stands in for it


# ---- the fake transformer_engine ---------------------------------------------------------------
# Signatures as in TE's module/linear.py, module/grouped_linear.py, quantization.py,
# distributed.py and common/recipe/__init__.py; constraints checked as TE's kernels check them.

class Format(enum.Enum):
    E4M3 = "e4m3"
    HYBRID = "hybrid"


@dataclasses.dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@dataclasses.dataclass
class Float8CurrentScaling:
    fp8_format: Format = Format.HYBRID


@dataclasses.dataclass
class MXFP8BlockScaling:
    margin: int = 0
    fp8_format: Format = Format.E4M3


@dataclasses.dataclass
class Float8BlockScaling:
    fp8_format: Format = Format.E4M3


class FP8GlobalStateManager:
    FP8_ENABLED = False
    FP8_RECIPE = None
    FP8_DISTRIBUTED_GROUP = None

    @classmethod
    def get_autocast_state(cls):
        return cls.FP8_ENABLED, cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP

    @classmethod
    def set_autocast_state(cls, state):
        cls.FP8_ENABLED, cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP = state


AUTOCASTS = []  # (recipe, amax_reduction_group) of every autocast entered
RECOMPUTE = {"enabled": False, "phase": False}
UNAVAILABLE = {}  # availability check name -> reason
# Delayed scaling's amax buffers, as TE's FP8GlobalStateManager keeps them: every module that ran
# FP8 under (recipe, group) is added once, at its first FP8 forward, and stays; the outermost
# autocast's exit max-reduces each buffer over its group (the default group for None).
AMAX_BUFFERS = {}  # (str(recipe), id(group)) -> (group, [module])
DEPTH = [0]


def reduce_amax_buffers():
    """quantization.py's reduce_and_update_fp8_tensors: one all-reduce per buffer, which pairs
    elementwise with the other ranks' buffers. TE would hang or mix amaxes if their sizes
    differed; the fake compares them first and says so."""
    for group, modules in AMAX_BUFFERS.values():
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            continue
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([len(modules)]), group=group)
        if len({int(n) for n in sizes}) > 1:
            raise RuntimeError(f"amax buffers differ across ranks: {[int(n) for n in sizes]} "
                               f"modules (TE's all-reduce would hang or mix amaxes)")
        dist.all_reduce(torch.ones(len(modules)), op=dist.ReduceOp.MAX, group=group)


@contextlib.contextmanager
def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None, _graph=False):
    AUTOCASTS.append((recipe, amax_reduction_group))
    state = FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE, \
        FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP
    FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE = enabled, recipe
    FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP = amax_reduction_group
    DEPTH[0] += 1
    try:
        yield
    finally:
        (FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE,
         FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP) = state
        DEPTH[0] -= 1
        if enabled and DEPTH[0] == 0 and torch.is_grad_enabled():
            reduce_amax_buffers()


class activation_recompute_forward(contextlib.AbstractContextManager):
    def __init__(self, activation_recompute=False, recompute_phase=False):
        self.activation_recompute, self.recompute_phase = activation_recompute, recompute_phase

    def __enter__(self):
        RECOMPUTE.update(enabled=self.activation_recompute, phase=self.recompute_phase)

    def __exit__(self, *exc):
        RECOMPUTE.update(enabled=False, phase=False)


def get_activation_recompute_contexts():
    return (activation_recompute_forward(activation_recompute=True, recompute_phase=False),
            activation_recompute_forward(activation_recompute=True, recompute_phase=True))


def availability(name):
    def check(return_reason=False):
        ok = name not in UNAVAILABLE
        return (ok, UNAVAILABLE.get(name, "")) if return_reason else ok
    return check


class _Module(nn.Module):
    """What the fake modules share with TE's base module: FP8 state set up by the first forward
    under autocast, delayed scaling's stash for activation recompute, `_extra_state` as an empty
    uint8 tensor until then and a pickle after."""

    def _prepare(self, rows: list[int], weights):
        if RECOMPUTE["phase"]:  # TE: quantise with the stashed scales, record no amax
            assert FP8GlobalStateManager.FP8_RECIPE is self.recipe, "recompute without the recipe"
            self.stash.popleft()
            return
        self.fp8 = FP8GlobalStateManager.FP8_ENABLED
        if not self.fp8:
            return
        self.recipe = FP8GlobalStateManager.FP8_RECIPE
        if isinstance(self.recipe, DelayedScaling) and not self.in_amax_buffer:
            group = FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP
            AMAX_BUFFERS.setdefault((str(self.recipe), id(group)), (group, []))[1].append(self)
            self.in_amax_buffer = True
        align = 32 if isinstance(self.recipe, MXFP8BlockScaling) else 16
        dims = [d for w in weights for d in w.shape]
        assert all(r % align == 0 for r in rows + dims), f"FP8 GEMM dims {rows} {dims} vs {align}"
        self.amax_records += 1
        if RECOMPUTE["enabled"]:
            self.stash.append(self.amax_records)

    def _init_fp8(self):
        self.fp8, self.recipe, self.amax_records, self.stash = False, None, 0, deque()
        self.in_amax_buffer = False

    def get_extra_state(self):
        if not self.fp8:
            return torch.empty(0, dtype=torch.uint8)
        state = {"recipe": self.recipe, "amax_records": self.amax_records}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state):
        assert isinstance(state, torch.Tensor)
        if state.numel():
            d = pickle.loads(state.numpy().tobytes())
            self.fp8, self.recipe, self.amax_records = True, d["recipe"], d["amax_records"]


class Linear(_Module):
    def __init__(self, in_features, out_features, sequence_parallel=False,
                 fuse_wgrad_accumulation=False, tp_group=None, tp_size=1,
                 get_rng_state_tracker=None, rng_tracker_name=None, init_method=None, bias=True,
                 return_bias=False, params_dtype=None, parallel_mode=None, parameters_split=None,
                 device="cuda", name=None):
        super().__init__()
        self._init_fp8()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features, dtype=params_dtype,
                                               device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=params_dtype, device=device))
        else:  # as TE: an empty tensor attribute, not a parameter
            self.bias = torch.Tensor().to(dtype=params_dtype, device=device)
        self.use_bias = bias

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        self._prepare([inp.reshape(-1, inp.shape[-1]).shape[0]], [self.weight])
        return F.linear(inp, self.weight, self.bias if self.use_bias else None)


class GroupedLinear(_Module):
    def __init__(self, num_gemms, in_features, out_features, sequence_parallel=False,
                 fuse_wgrad_accumulation=False, tp_group=None, tp_size=1,
                 get_rng_state_tracker=None, rng_tracker_name=None, init_method=None, bias=True,
                 return_bias=False, params_dtype=None, parallel_mode=None, device="cuda",
                 name=None):
        super().__init__()
        self._init_fp8()
        self.num_gemms, self.in_features, self.out_features = num_gemms, in_features, out_features
        for i in range(num_gemms):
            self.register_parameter(f"weight{i}", nn.Parameter(
                torch.randn(out_features, in_features, dtype=params_dtype, device=device)))
            setattr(self, f"bias{i}", torch.Tensor().to(dtype=params_dtype, device=device))
        self.seen_splits = []

    def forward(self, inp, m_splits, is_first_microbatch=None):
        assert len(m_splits) == self.num_gemms, "Number of splits should match number of GEMMs."
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]  # as TE reads them
        assert list(self.named_parameters())[0][0] == "weight0"  # TE's device context reads it
        self._prepare(list(m_splits), weights[:1])
        self.seen_splits.append(list(m_splits))
        return torch.cat([x @ w.T for x, w in zip(inp.split(m_splits), weights)])


def fake_te_package() -> dict[str, types.ModuleType]:
    root, pt, common = (types.ModuleType(n) for n in
                        ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.common"))
    recipe = types.ModuleType("transformer_engine.common.recipe")
    dist = types.ModuleType("transformer_engine.pytorch.distributed")
    quant = types.ModuleType("transformer_engine.pytorch.quantization")
    for cls in (Format, DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling, Float8BlockScaling):
        setattr(recipe, cls.__name__, cls)
    dist.activation_recompute_forward = activation_recompute_forward
    dist.get_activation_recompute_contexts = get_activation_recompute_contexts
    quant.FP8GlobalStateManager = FP8GlobalStateManager
    pt.Linear, pt.GroupedLinear, pt.autocast = Linear, GroupedLinear, autocast
    pt.distributed, pt.quantization = dist, quant
    for name in ("is_fp8_available", "is_mxfp8_available", "is_fp8_block_scaling_available"):
        setattr(pt, name, availability(name))
    root.pytorch, root.common, common.recipe = pt, common, recipe
    return {m.__name__: m for m in (root, pt, common, recipe, dist, quant)}


@pytest.fixture(autouse=True)
def fake_te(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin
    modules = fake_te_package()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(fp8_te, "check_device", lambda device: None)  # the fake runs on CPU
    AUTOCASTS.clear()
    UNAVAILABLE.clear()
    AMAX_BUFFERS.clear()
    yield modules["transformer_engine.pytorch"]
    torch.set_num_threads(threads)


def chosen(model, p=TE):
    return [r.name for r in precision_table(model, p) if r.precision == "fp8"]


def tiny_pair():
    torch.manual_seed(0)
    plain = Qwen35LM(load_model_config("tiny"))
    te_model = copy.deepcopy(plain)
    return plain, te_model, fp8_te.apply_te(te_model, chosen(plain), TE, CPU)


# ---- swapping -------------------------------------------------------------------------------------

def test_only_the_chosen_modules_are_swapped_and_the_keys_stay():
    plain, te_model, _ = tiny_pair()
    names = set(chosen(plain))
    for name, m in plain.named_modules():
        new = te_model.get_submodule(name)
        if name in names:
            assert type(new) in (fp8_te.TELinear, fp8_te.TEGroupedExperts), name
        elif isinstance(m, (nn.Linear, GroupedExperts)):
            assert type(new) is type(m), name
    assert {"layers.1.mlp.experts", "layers.2.linear_attn.out_proj"} <= names
    assert "lm_head" not in names and not any(n.startswith("layers.0.") for n in names)
    old, new = set(plain.state_dict()), set(te_model.state_dict())
    assert old <= new and all(k.endswith("_extra_state") for k in new - old)
    assert {"layers.1.mlp.experts.te_gate_up._extra_state",
            "layers.2.linear_attn.out_proj._extra_state"} <= new
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in te_model.named_parameters()]


def test_the_swapped_model_computes_the_same_function():
    """The fake TE computes what the plain modules compute, so loss and every gradient match;
    under its autocast it also checks that each GEMM's rows are padded to 16."""
    plain, te_model, autocast_factory = tiny_pair()
    ids = torch.randint(0, 1024, (2, 37))  # 74 tokens: the linears must pad
    losses = []
    for model, ctx in ((plain, contextlib.nullcontext), (te_model, autocast_factory)):
        with ctx():
            loss = model(ids, labels=torch.roll(ids, -1, 1)).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    grads = dict(te_model.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    assert te_model.get_submodule("layers.1.mlp.shared_expert.down_proj").te.fp8  # ran in "FP8"


@pytest.mark.parametrize("recipe,align", [("delayed", 16), ("mxfp8", 32)])
def test_grouped_experts_pad_uneven_groups_and_keep_an_empty_expert(recipe, align):
    torch.manual_seed(0)
    ref = GroupedExperts(4, 32, 32)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.1)
    ex = copy.deepcopy(ref)
    p = PrecisionConfig(backend="te", recipe=recipe)
    autocast_factory = fp8_te.apply_te(nn.ModuleDict({"ex": ex}), ["ex"], p, CPU)
    counts = torch.tensor([5, 0, 19, 3])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref = ref(x, counts)
    with autocast_factory():
        y = ex(x2, counts)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad)
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(getattr(ex, name).grad, getattr(ref, name).grad)
    assert ex.gate_up_proj.grad[1].abs().max() == 0  # no tokens, no gradient
    want = [-(-c // align) * align for c in counts.tolist()]
    assert ex.te_gate_up.seen_splits == [want] and ex.te_down.seen_splits == [want]
    assert all(ex.te_gate_up._parameters[f"weight{i}"] is None for i in range(4))  # views removed


# ---- recipe, autocast, checkpoint state ---------------------------------------------------------------

@pytest.mark.parametrize("recipe,fmt,cls,kwargs", [
    ("delayed", "hybrid", DelayedScaling, dict(margin=1, fp8_format=Format.HYBRID,
                                               amax_history_len=16, amax_compute_algo="most_recent")),
    ("tensorwise", "hybrid", Float8CurrentScaling, dict(fp8_format=Format.HYBRID)),
    ("mxfp8", "e4m3", MXFP8BlockScaling, dict(fp8_format=Format.E4M3)),
    ("blockwise", "e4m3", Float8BlockScaling, dict(fp8_format=Format.E4M3))])
def test_recipe_from_config(recipe, fmt, cls, kwargs):
    p = PrecisionConfig(backend="te", recipe=recipe, fp8_format=fmt, margin=1, amax_history_len=16,
                        amax_compute_algo="most_recent")
    assert fp8_te.make_recipe(p) == cls(**kwargs)


def test_autocast_gets_the_recipe_and_the_amax_reduction_group(fake_te):
    group = object()
    model = nn.ModuleDict({"lin": nn.Linear(32, 32)})
    factory = fp8_te.apply_te(model, ["lin"], TE, CPU, amax_reduction_group=group)
    with factory():
        model.lin(torch.randn(3, 32))
    assert AUTOCASTS == [(DelayedScaling(), group)]
    del fake_te.autocast  # older TE: fp8_autocast(fp8_recipe=..., fp8_group=...)
    seen = []
    fake_te.fp8_autocast = lambda enabled, fp8_recipe, fp8_group: seen.append(
        (enabled, fp8_recipe, fp8_group)) or contextlib.nullcontext()
    with fp8_te.apply_te(nn.ModuleDict({"lin": nn.Linear(32, 32)}), ["lin"], TE, CPU, group)():
        pass
    assert seen == [(True, DelayedScaling(), group)]


def test_fp8_state_survives_a_dcp_checkpoint(tmp_path):
    """TE's `_extra_state` grows from 0 bytes at the first FP8 forward; a resume builds the model
    afresh, so DCP must not load it in place into the empty one."""
    from train.checkpoint import load_checkpoint, save_checkpoint

    _, model, autocast_factory = tiny_pair()
    ids = torch.randint(0, 1024, (2, 32))
    with autocast_factory():
        model(ids, labels=ids).loss.backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    path = save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    _, fresh, _ = tiny_pair()
    key = "layers.1.mlp.experts.te_gate_up._extra_state"
    assert fresh.state_dict()[key] == b""  # as a tensor: 0 bytes, and DCP would refuse to load
    load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()))
    state = fresh.state_dict()
    assert state[key] == model.state_dict()[key] != b""
    assert fresh.layers[1].mlp.experts.te_gate_up.amax_records == 1
    linear = "layers.1.mlp.shared_expert.down_proj"  # a TELinear's: its te.Linear's state
    assert state[f"{linear}._extra_state"] == model.state_dict()[f"{linear}._extra_state"] != b""
    assert fresh.get_submodule(linear).te.amax_records == 1


@pytest.mark.parametrize("older_te", [False, True])
def test_activation_checkpointing_recomputes_with_the_forward_state(fake_te, monkeypatch, older_te):
    """Through torch.utils.checkpoint with checkpoint_contexts: the recompute runs in TE's
    recompute phase with the forward's recipe, takes the stash the forward left, records no amax.
    Older TE: no get_activation_recompute_contexts, get/set_fp8_autocast_state."""
    if older_te:
        monkeypatch.delattr(fake_te.distributed, "get_activation_recompute_contexts")
        for verb in ("get", "set"):
            method = getattr(FP8GlobalStateManager, f"{verb}_autocast_state")
            monkeypatch.delattr(FP8GlobalStateManager, f"{verb}_autocast_state")
            monkeypatch.setattr(FP8GlobalStateManager, f"{verb}_fp8_autocast_state", method,
                                raising=False)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    model = copy.deepcopy(ref)
    factory = fp8_te.apply_te(model, ["0", "2"], TE, CPU)
    x = torch.randn(5, 32, requires_grad=True)
    with factory():
        y = cp.checkpoint(model, x, use_reentrant=False, context_fn=fp8_te.checkpoint_contexts,
                          early_stop=False)
    y.square().sum().backward()  # backward, and so the recompute, outside the autocast
    ref(x.detach()).square().sum().backward()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    for m in (model[0].te, model[2].te):
        assert m.amax_records == 1 and not m.stash
    assert FP8GlobalStateManager.FP8_RECIPE is None and not RECOMPUTE["phase"]  # all restored


# ---- errors ------------------------------------------------------------------------------------------

def test_clear_errors(monkeypatch):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU" if not torch.cuda.is_available()
                       else "needs train.device=cuda"):
        REAL_CHECK_DEVICE(CPU)
    mxfp8 = PrecisionConfig(backend="te", recipe="mxfp8")
    with pytest.raises(ValueError, match=r"ex: precision.recipe='mxfp8' needs weight dims in "
                                         r"multiples of 32.*extra_exclude"):
        fp8_te.apply_te(nn.ModuleDict({"ex": GroupedExperts(2, 48, 16)}), ["ex"], mxfp8, CPU)
    UNAVAILABLE["is_mxfp8_available"] = "Device compute capability 10.0 or higher required"
    with pytest.raises(RuntimeError, match="recipe='mxfp8' is not supported here: Device compute"):
        fp8_te.apply_te(nn.Linear(32, 32), [], mxfp8, CPU)
    with pytest.raises(ValueError, match="recipe='delayed', parallel.ep=2 and precision.grouped"):
        fp8_te.apply_te(nn.ModuleDict({"ex": GroupedExperts(4, 32, 16)}), ["ex"], TE, CPU, ep_size=2)
    assert fp8_te.te_layout_error(4, False, "delayed") is None
    assert fp8_te.te_layout_error(4, True, "tensorwise") is None
    ex = nn.ModuleDict({"ex": GroupedExperts(4, 32, 16)})  # built for 2 experts, runs all 4
    fp8_te.apply_te(ex, ["ex"], PrecisionConfig(backend="te", recipe="tensorwise"), CPU, ep_size=2)
    with pytest.raises(RuntimeError, match="built for 2 experts per rank, this rank computes 4"):
        ex["ex"](torch.randn(4, 32), torch.tensor([1, 1, 1, 1]))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # the import fails
    with pytest.raises(RuntimeError, match="cannot import transformer_engine.pytorch.*fp8_emulated"):
        fp8_te.apply_te(nn.Linear(32, 32), [], TE, CPU)


# ---- parallel layouts (2 gloo ranks) -----------------------------------------------------------------

def _te_layout_worker(rank, world, sizes, recipe):
    """Two AdamW steps (fp64) of the tiny model with every policy-chosen GEMM through the fake TE,
    under the layout `sizes`, against the plain model in one process accumulating every dp rank's
    batch: the fake computes the plain function, so losses and gathered gradients match."""
    from parallel.plan import parallelize
    from tests.test_parallel_plans import full
    from tests.test_pipeline import model_inputs, text_batch
    from train.fp8_policy import apply_precision, fp8_amax_group

    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    ref = Qwen35LM(cfg).double()
    model = copy.deepcopy(ref)
    pcfg = ParallelConfig(**sizes)
    meshes = build_meshes(validate_layout(pcfg, cfg, world, seq_len=32), "cpu")
    p = PrecisionConfig(backend="te", recipe=recipe, keep_first_n=0, keep_last_n=0)
    fp8, _ = apply_precision(model, p, CPU, fp8_amax_group(meshes), pcfg.ep)
    parallelize(model, meshes, pcfg, CPU, fp8.checkpoint_contexts)
    if pcfg.tp > 1:  # row-parallel: TELinear computes on the DTensor's local shard
        assert model.layers[3].self_attn.o_proj.weight.placements == (Shard(1),)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    dp = meshes.dp_size
    for step in range(2):
        batches = [text_batch(10 * step + r) for r in range(dp)]
        total = sum(b["num_tokens"] for b in batches)
        ref_opt.zero_grad()
        ref_losses = []
        for b in batches:
            out = ref(**model_inputs(b))
            (out.loss * b["num_tokens"] / total).backward()
            ref_losses.append(float(out.loss))
        mine = batches[meshes.dp_rank]
        opt.zero_grad()
        with fp8.autocast():
            out = model(**model_inputs(mine))
        (out.loss * mine["num_tokens"] / total).backward()
        match_grad_placements(model.parameters())
        assert abs(float(out.loss) - ref_losses[meshes.dp_rank]) < 1e-10, (step, float(out.loss))
        ref_params = dict(ref.named_parameters())
        bad = [n for n, q in model.named_parameters() if q.grad is not None and not torch.allclose(
            full(q.grad), ref_params[n].grad, rtol=1e-8, atol=1e-11)]
        assert not bad, f"step {step} rank {rank}: {bad}"
        opt.step()
        ref_opt.step()
    experts = model.layers[1].mlp.experts
    assert experts.te_gate_up.num_gemms == 8 // pcfg.ep and experts.te_gate_up.amax_records == 2
    assert model.layers[1].mlp.shared_expert.down_proj.te.amax_records == 2  # ran "FP8" twice


@pytest.mark.parametrize("world,sizes,recipe", [
    (2, {"tp": 2, "activation_checkpoint": "full"}, "delayed"),
    (2, {"dp_shard": 2, "ep": 2}, "tensorwise"),
], ids=["tp2-ac-delayed", "ep2-fsdp2-tensorwise"])
def test_te_layout_matches_one_process(world, sizes, recipe):
    """TE under tensor + sequence parallelism (column- and row-parallel DTensor weights, and the
    mixers' local shards) and under expert parallelism with FSDP2 (each rank's GroupedLinears
    built for its 4 of the 8 experts)."""
    from tests.distributed import run_ranks

    run_ranks(world, _te_layout_worker, sizes, recipe)


def _vision_tower_worker(rank, world):
    from tests.test_pipeline import model_inputs, text_batch
    from tests.vision_fixtures import ToyTokenizer, caption_batch

    batch = caption_batch(ToyTokenizer(), 0, rows=2) if rank == 0 else text_batch(0)
    group = dist.group.WORLD
    torch.manual_seed(0)
    model = Qwen35LM(load_model_config("tiny_vl")).double()
    # The ViT's layers in FP8 too (as the emulated policy has them): rank 1 has no image, so the
    # two ranks' delayed-scaling amax buffers differ.
    names = chosen(model, PrecisionConfig(backend="emulated"))
    assert any(n.startswith("visual.") for n in names)
    factory = fp8_te.apply_te(model, names, TE, CPU, group)
    with pytest.raises(RuntimeError, match="amax buffers differ across ranks"):
        with factory():
            model(**model_inputs(batch))
    AMAX_BUFFERS.clear()
    torch.manual_seed(0)
    model = Qwen35LM(load_model_config("tiny_vl")).double()
    fp8, _ = apply_precision(model, TE, CPU, group)  # the policy keeps the ViT in BF16
    assert not any(isinstance(m, fp8_te.TELinear) for m in model.visual.modules())
    for _ in range(2):
        with fp8.autocast():
            out = model(**model_inputs(batch))
        out.loss.backward()


def test_vision_tower_stays_bf16_under_te_delayed_scaling():
    """TE's delayed scaling all-reduces, at the autocast's exit, the amaxes of every FP8 module a
    rank has run (the fake does it as TE does); a rank whose micro-batch has no image skips the
    vision tower, so the policy keeps the ViT's layers in BF16 with that recipe. TE's other
    recipes keep no state across ranks and keep the ViT in FP8."""
    from tests.distributed import run_ranks

    vl = Qwen35LM(load_model_config("tiny_vl"))
    rows = {r.name: r for r in precision_table(vl, TE)}
    assert rows["visual.blocks.0.attn.qkv"].precision == "bf16"
    assert "image-less ranks" in rows["visual.blocks.0.attn.qkv"].reason
    assert "visual.blocks.0.attn.qkv" in chosen(vl, PrecisionConfig(backend="te", recipe="tensorwise"))
    run_ranks(2, _vision_tower_worker, timeout_s=60)


def test_config_refuses_delayed_scaling_of_expert_parallel_experts(monkeypatch):
    from model.config import ConfigError
    from train.main import load_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="recipe='delayed', parallel.ep=2 and precision.grouped"):
        load_config(["model=tiny", "precision=fp8_te", "parallel.ep=2"])
