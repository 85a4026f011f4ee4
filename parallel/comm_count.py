"""Counting what the collectives of a training step move, as they run: per collective kind and
process group, the calls, the payload and the bytes this rank sends.

`CommCounter` is a TorchDispatchMode. It sees both families of collectives a step issues:

- the c10d ops behind `torch.distributed.*` (`torch.ops.c10d.allreduce_`, `_allgather_base_`,
  `_reduce_scatter_base_`, `alltoall_base_`, ...), which FSDP2, the EP dispatcher, the vision plan,
  the vocab-parallel cross-entropy and the trainer's scalar reductions call;
- the functional collectives DTensor redistributions issue (`torch.ops._c10d_functional.*`: the
  tensor/sequence-parallel all-gathers, reduce-scatters and all-reduces). Ops on DTensors are handed
  back to DTensor (NotImplemented, as `CommDebugMode` does), so the mode sees the collectives they
  lower to. A functional collective is counted once: the c10d op it calls inside runs with the mode
  off.

Bytes this rank sends, for a group of n ranks (the volume of the bandwidth-optimal algorithm, the
same whichever algorithm the backend picks; "payload" is the tensor the call is about):

    all_gather      payload = output bytes (n x the input)   sent = payload * (n-1)/n
    reduce_scatter  payload = input bytes (n x the output)   sent = payload * (n-1)/n
    all_reduce      payload = buffer bytes                    sent = 2 * payload * (n-1)/n  (ring:
                                                              a reduce-scatter, then an all-gather)
    all_to_all      payload = input bytes                     sent = input rows addressed to the
                                                              other ranks (its own split stays)
    broadcast       payload = buffer bytes                    sent = payload * (n-1)/n (a ring
                                                              pipeline, averaged over ranks)

Groups of size 1 are counted (calls, payload) with 0 bytes sent. Groups are named through
`mesh_group_labels(meshes)` by the mesh dimension they are (tp, dp_shard, ep, ...).

    counter = CommCounter(mesh_group_labels(meshes))
    with counter:
        ...one step...
    print(counter.table())
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast")

_c10d = torch.ops.c10d
_fun = torch.ops._c10d_functional
_fun_ag = torch.ops._c10d_functional_autograd

# op packet -> (kind, how to read it); the readers return (payload bytes, sent bytes, group).
_C10D = {
    _c10d.allreduce_: "all_reduce", _c10d.allreduce_coalesced_: "all_reduce",
    _c10d._allgather_base_: "all_gather", _c10d.allgather_: "all_gather",
    _c10d.allgather_into_tensor_coalesced_: "all_gather", _c10d.allgather_coalesced_: "all_gather",
    _c10d._reduce_scatter_base_: "reduce_scatter", _c10d.reduce_scatter_: "reduce_scatter",
    _c10d.reduce_scatter_tensor_coalesced_: "reduce_scatter",
    _c10d.alltoall_base_: "all_to_all", _c10d.alltoall_: "all_to_all",
    _c10d.broadcast_: "broadcast",
}
_FUNCTIONAL = {
    _fun.all_reduce: "all_reduce", _fun.all_reduce_: "all_reduce",
    _fun.all_reduce_coalesced: "all_reduce", _fun.all_reduce_coalesced_: "all_reduce",
    _fun.all_gather_into_tensor: "all_gather", _fun.all_gather_into_tensor_out: "all_gather",
    _fun.all_gather_into_tensor_coalesced: "all_gather",
    _fun.reduce_scatter_tensor: "reduce_scatter", _fun.reduce_scatter_tensor_coalesced: "reduce_scatter",
    _fun.all_to_all_single: "all_to_all", _fun_ag.all_to_all_single: "all_to_all",
    _fun.broadcast: "broadcast", _fun.broadcast_: "broadcast",
}


def sent_bytes(kind: str, payload: int, n: int) -> Fraction:
    """Bytes one rank sends for a collective of `kind` over n ranks (all_to_all: pass the bytes
    addressed to other ranks as `payload`; they are returned as they are)."""
    if n <= 1:
        return Fraction(0)
    if kind == "all_to_all":
        return Fraction(payload)
    share = Fraction(payload * (n - 1), n)
    return 2 * share if kind == "all_reduce" else share


@dataclass
class CommStat:
    calls: int = 0
    payload: int = 0                   # bytes, as defined in the module docstring
    sent: Fraction = Fraction(0)       # bytes this rank sends

    def add(self, other: "CommStat") -> None:
        self.calls += other.calls
        self.payload += other.payload
        self.sent += other.sent


# (kind, group label) -> CommStat
CommTable = dict[tuple[str, str], CommStat]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _process_group(obj) -> Optional[dist.ProcessGroup]:
    """A c10d op's ScriptObject, a ProcessGroup, or a functional collective's group name -> the group."""
    if isinstance(obj, dist.ProcessGroup):
        return obj
    if isinstance(obj, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(obj)
    try:
        return dist.ProcessGroup.unbox(obj)
    except Exception:  # noqa: BLE001 - not a process group: leave the call unnamed
        return None


# Mesh dimensions that own a process group, in label order; a group that several of them share
# (a dimension that spans the whole world reuses the default group) is named by all: "dp_shard+ep".
PRIMARY_ROLES = ("dp_shard", "dp_replicate", "tp", "ep", "expert_dp")
# Groups that only name themselves when no primary role owns the same group.
SECONDARY_ROLES = ("dp", "vision", "cp", "pp")


def mesh_group_labels(meshes) -> dict[str, str]:
    """{process group name: label} for the groups of a `parallel.mesh.Meshes`, named by the mesh
    dimension they are: dp_shard (FSDP's shard group, dp_shard x cp), dp_replicate, tp, ep,
    expert_dp (the routed experts' FSDP shard group under EP); then, for groups none of those own,
    dp (the loss reductions' group under HSDP), vision, cp, pp. A group shared by several primary
    dimensions is named by all of them joined with '+' (e.g. with ep = dp_shard = the world size,
    FSDP's group and the EP group are both the default group)."""
    roles: dict[str, list[str]] = {}

    def claim(role: str, mesh, dims=None) -> None:
        if mesh is None:
            return
        for d in (range(mesh.ndim) if dims is None else dims):
            name = mesh.get_group(d).group_name
            if role in PRIMARY_ROLES:
                roles.setdefault(name, [])
                if role not in roles[name]:
                    roles[name].append(role)
            elif name not in roles:
                roles[name] = [role]

    fsdp = meshes.fsdp
    claim("dp_shard", fsdp, [fsdp.ndim - 1])
    if fsdp.ndim == 2:
        claim("dp_replicate", fsdp, [0])
    claim("tp", meshes.tp)
    claim("ep", meshes.ep)
    if meshes.expert_fsdp is not None:
        claim("expert_dp", meshes.expert_fsdp, [meshes.expert_fsdp.ndim - 1])
    for role, mesh in (("dp", meshes.loss), ("vision", meshes.vision), ("cp", meshes.cp),
                       ("pp", meshes.pp)):
        claim(role, mesh)
    labels = {name: "+".join(r) for name, r in roles.items() if r}
    if dist.is_initialized():
        labels.setdefault(dist.group.WORLD.group_name, "world")
    return labels


class CommCounter(TorchDispatchMode):
    """Records every collective run under it: `self.stats[(kind, label)]` -> CommStat, and, with
    `keep_events=True`, `self.events`: (kind, label, group size, payload, sent) per call in order.

    labels: {process group name: label}, e.g. `mesh_group_labels(meshes)`; other groups are named
    `group<name>/n<size>`. Counts everything until `reset()`; enter and exit as often as needed."""

    def __init__(self, labels: Optional[dict[str, str]] = None, keep_events: bool = False):
        super().__init__()
        self.labels = dict(labels or {})
        self.keep_events = keep_events
        self.stats: CommTable = defaultdict(CommStat)
        self.events: list[tuple[str, str, int, int, Fraction]] = []

    def reset(self) -> None:
        self.stats = defaultdict(CommStat)
        self.events = []

    def label(self, group: Optional[dist.ProcessGroup]) -> tuple[str, int]:
        if group is None:
            return "unknown", 1
        name, size = group.group_name, group.size()
        return self.labels.get(name, f"group{name}/n{size}"), size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower the op; its collectives come back through here
        packet = getattr(func, "_overloadpacket", None)
        if packet in _C10D:
            self._record(_C10D[packet], *self._read_c10d(packet, args, kwargs))
        elif packet in _FUNCTIONAL:
            self._record(_FUNCTIONAL[packet], *self._read_functional(packet, args, kwargs))
        return func(*args, **kwargs)

    def _record(self, kind: str, payload: int, to_others: Optional[int], group) -> None:
        label, n = self.label(group)
        sent = sent_bytes(kind, to_others if kind == "all_to_all" else payload, n)
        stat = self.stats[(kind, label)]
        stat.calls += 1
        stat.payload += payload
        stat.sent += sent
        if self.keep_events:
            self.events.append((kind, label, n, payload, sent))

    @staticmethod
    def _a2a_to_others(inp: torch.Tensor, in_splits, group) -> int:
        """Bytes of `inp` [rows, ...] addressed to ranks other than this one."""
        if group is None or group.size() == 1:
            return 0
        n, me = group.size(), group.rank()
        rows = inp.shape[0] if inp.dim() else 1
        row_bytes = _nbytes(inp) // max(rows, 1)
        splits = list(in_splits) if in_splits else [rows // n] * n
        return (sum(splits) - splits[me]) * row_bytes

    def _read_c10d(self, packet, args, kwargs):
        a = list(args)
        if packet in (_c10d.allreduce_, _c10d.allreduce_coalesced_, _c10d.broadcast_):
            return sum(map(_nbytes, _tensors(a[0]))), None, _process_group(a[1])
        if packet is _c10d.alltoall_base_:
            out, inp, pg, _, in_splits = a[:5]
            group = _process_group(pg)
            return _nbytes(inp), self._a2a_to_others(inp, in_splits, group), group
        if packet is _c10d.alltoall_:
            _, ins, pg = a[:3]
            group = _process_group(pg)
            me = group.rank() if group is not None else 0
            return (sum(map(_nbytes, ins)),
                    sum(_nbytes(t) for r, t in enumerate(ins) if r != me), group)
        # all-gathers: payload = outputs; reduce-scatters: payload = inputs
        out, inp, pg = a[:3]
        group = _process_group(pg)
        which = out if _C10D[packet] == "all_gather" else inp
        return sum(map(_nbytes, _tensors(which))), None, group

    def _read_functional(self, packet, args, kwargs):
        a = list(args)
        group = _process_group(kwargs.get("group_name", a[-1]))
        n = group.size() if group is not None else 1
        kind = _FUNCTIONAL[packet]
        inputs = _tensors(a[0])
        if kind == "all_gather":
            return sum(map(_nbytes, inputs)) * n, None, group
        if kind == "all_to_all":
            inp, _, in_splits = a[0], a[1], a[2]
            return _nbytes(inp), self._a2a_to_others(inp, in_splits, group), group
        return sum(map(_nbytes, inputs)), None, group

    # ---- reports -------------------------------------------------------------------------------

    def table(self) -> CommTable:
        return {k: v for k, v in sorted(self.stats.items())}


def merge_tables(tables: Iterable[CommTable]) -> CommTable:
    out: CommTable = defaultdict(CommStat)
    for t in tables:
        for key, stat in t.items():
            out[key].add(stat)
    return dict(sorted(out.items()))


def format_bytes(n: float) -> str:
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
