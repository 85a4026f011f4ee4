"""Peak live tensor bytes of a piece of code, on any device (CPU included): the measurement that
parallel/memory.py's estimate is checked against.

    with LiveBytes(model.parameters(), optimizer_tensors(optimizer)) as mem:
        trainer.train_step()
    mem.peak, mem.current, mem.peak_by_device

A TorchDispatchMode sees every tensor an op returns; each new storage is counted (by its
StorageImpl, so views and in-place results are counted once) until it is freed, which a weakref
finalizer on the storage reports (torch keeps one Python object per live storage). Tensors alive
before the block (parameters, gradients, optimizer states, the batch) are invisible to the mode:
pass them in to count them from the start. DTensors count their local shards; FSDP2's unsharded
parameters, which it frees and re-allocates by resizing their storages in place (no op sees it),
are followed through `UntypedStorage.resize_`. Fake tensors (parallel/rehearse.py) count like real
ones: their storages have sizes. Allocator caching and fragmentation are not measured, only what
tensors hold; meta tensors are ignored.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Iterable, Optional

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Tracks live storage bytes while active. `peak`, `current`: bytes over all devices;
    `peak_by_device`, `current_by_device`: per device type ("cpu", "cuda"); `peak_phase`: the label
    (`mark`) current when the peak was reached."""

    def __init__(self, *preexisting: Iterable[torch.Tensor]):
        super().__init__()
        self._live: dict[int, tuple[str, int]] = {}
        self.current = 0
        self.peak = 0
        self.current_by_device: dict[str, int] = defaultdict(int)
        self.peak_by_device: dict[str, int] = defaultdict(int)
        self.phase = ""
        self.peak_phase = ""
        for group in preexisting:
            for t in group:
                self.track(t)

    def mark(self, phase: str) -> None:
        """Label what runs next (e.g. "forward", "backward", "optimizer") for `peak_phase`."""
        self.phase = phase

    def track(self, t) -> None:
        """Count `t`'s storage from now on (no-op for non-tensors, meta tensors, counted storages)."""
        if isinstance(t, DTensor):
            t = t._local_tensor
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensor subclasses without storage
            return
        key = st._cdata
        if key in self._live:
            return
        dev, n = t.device.type, st.nbytes()
        self._live[key] = (dev, n)
        self.current += n
        self.current_by_device[dev] += n
        weakref.finalize(st, self._free, key)
        self._update_peak()

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            out = resize(storage, size)
            key = storage._cdata
            if key in tracker._live:
                dev, old = tracker._live[key]
                n = storage.nbytes()
                tracker._live[key] = (dev, n)
                tracker.current += n - old
                tracker.current_by_device[dev] += n - old
                tracker._update_peak()
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_by_device = defaultdict(int, self.current_by_device)

    def _free(self, key: int) -> None:
        dev, n = self._live.pop(key, ("", 0))
        self.current -= n
        if dev:
            self.current_by_device[dev] -= n

    def _update_peak(self) -> None:
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
        for dev, n in self.current_by_device.items():
            if n > self.peak_by_device[dev]:
                self.peak_by_device[dev] = n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def optimizer_tensors(optimizer: Optional[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (AdamW: exp_avg, exp_avg_sq, step)."""
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


def grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def tensor_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages under `tensors` (DTensors: their local shards)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total
