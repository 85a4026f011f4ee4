"""Named collectives: the project's own all-reduces, all-gathers and all-to-alls, called through
helpers that carry a name, so that a hang or a dead peer fails with a message saying which
collective of which plan stalled, on which group, after how long:

    collective 'tp all_reduce vocab-parallel CE max' on the tp group (ranks [0, 1]) did not complete
    within parallel.collective_timeout_s=30 s: a rank died, hangs, or diverged (skipped this
    collective or called another); see the other ranks' logs for the step and collective they were
    in. ([.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv ...)

The name also labels the call in profiler traces (`record_function`). What these helpers cannot
name are the collectives torch issues itself (FSDP2's all-gathers and reduce-scatters, DTensor
redistributions): those still fail after the same process-group timeout, with torch's own message
(gloo: "Timed out waiting ...ms"; NCCL: its watchdog's "Watchdog caught collective operation
timeout: WorkNCCL(SeqNum=..., OpType=...)", which aborts the process). `StepWatchdog` covers them
from the trainer's side: each rank logs which step has run too long, and the named collective it is
in, if any.

On NCCL the helpers only enqueue: a hang surfaces at the next host sync or through NCCL's watchdog,
so there the step watchdog's "last named collective started" line is the pointer.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.autograd.profiler import record_function

log = logging.getLogger("parallel")


class CollectiveError(RuntimeError):
    """A named collective that timed out or lost a peer. The message names the collective, its
    group and ranks, the timeout and the backend's own error (also chained as __cause__)."""


# The named collective this process is in, or last started: (name, group, start time). Read by
# StepWatchdog's thread; plain assignments of tuples are atomic under the GIL.
_in_flight: Optional[tuple[str, Optional[dist.ProcessGroup], float]] = None
_last: Optional[tuple[str, Optional[dist.ProcessGroup], float]] = None


def group_label(group: Optional[dist.ProcessGroup]) -> str:
    """'the tp group (ranks [0, 1])': a DeviceMesh group's description is `mesh_<dim>`; a mesh
    dimension spanning the whole world reuses the default group ('the world group')."""
    if not dist.is_initialized():
        return "no process group"
    if group is None:
        group = dist.group.WORLD
    desc = getattr(group, "group_desc", "") or ""
    try:
        ranks = dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError):
        ranks = "?"
    if desc == "default_pg":
        return f"the world group (ranks {ranks})"
    if desc.startswith("mesh_"):
        return f"the {desc.removeprefix('mesh_')} group (ranks {ranks})"
    return f"process group {getattr(group, 'group_name', '?')} (ranks {ranks})"


def group_timeout_s(group: Optional[dist.ProcessGroup]) -> Optional[float]:
    """The timeout the group's backend was created with (`parallel.collective_timeout_s` for the
    trainer's groups); None where torch does not expose it."""
    if group is None:
        group = dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            backend = group._get_backend(torch.device(device))
            return backend.options._timeout.total_seconds()
        except (RuntimeError, AttributeError, ValueError):
            continue
    return None


def describe_failure(name: str, group, elapsed_s: float, error: BaseException) -> str:
    timeout = group_timeout_s(group)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    timed_out = "timed out" in text.lower() or "timeout" in text.lower() or (
        timeout is not None and elapsed_s >= 0.9 * timeout)
    where = f"collective '{name}' on {group_label(group)}"
    if timed_out:
        limit = (f"parallel.collective_timeout_s={timeout:g} s" if timeout is not None
                 else "the process group's timeout")
        what = f"did not complete within {limit}"
    else:
        what = f"failed after {elapsed_s:.1f} s"
    return (f"{where} {what}: a rank died, hangs, or diverged (skipped this collective or called "
            f"another); see the other ranks' logs for the step and collective they were in. "
            f"({text})")


@contextmanager
def named(name: str, group: Optional[dist.ProcessGroup] = None) -> Iterator[None]:
    """Run the collective(s) inside under `name`: a profiler range, the in-flight record the step
    watchdog reports, and a CollectiveError naming it when the backend raises."""
    global _in_flight, _last
    start = time.monotonic()
    _in_flight = _last = (name, group, start)
    try:
        with record_function(name):
            yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # gloo/NCCL errors, torch.distributed.DistBackendError included
        raise CollectiveError(describe_failure(name, group, time.monotonic() - start, e)) from e
    finally:
        _in_flight = None


def all_reduce(t: torch.Tensor, name: str, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all_reduce of `t` (any shape) over `group`; returns `t`."""
    with named(name, group):
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, name: str, group=None) -> torch.Tensor:
    """inp [n, ...] on each of the P ranks -> out [P * n, ...], rank-major; returns `out`."""
    # torch 2.13 renamed all_gather_into_tensor (deprecated there); 2.11 has only the old name.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    with named(name, group):
        fn(out, inp, group=group)
    return out


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, name: str,
                      group=None) -> torch.Tensor:
    """`dist.all_to_all_single` (uneven splits allowed: rows per peer rank); returns `out`."""
    with named(name, group):
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    return out


def in_flight() -> Optional[tuple[str, Optional[dist.ProcessGroup], float]]:
    """(name, group, monotonic start time) of the named collective this process is in, else None."""
    return _in_flight


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


class StepWatchdog:
    """A daemon thread that logs (as a warning, so every rank's log shows it) when one phase of the
    training loop has run longer than `after_s`, and again every `after_s` after that:

        step 7 has run 300 s (parallel.collective_timeout_s=600); this rank is in collective
        'ep all_to_all tokens dispatch (layers.1.mlp)' on the ep group (ranks [0, 1]) since 299 s

    The trainer warns at half the collective timeout, so the line is in the log before a hung
    collective's timeout ends the process. `begin(label)` starts a phase (ending the previous one),
    `close()` stops the thread.
    """

    def __init__(self, after_s: float, timeout_s: Optional[float] = None, poll_s: Optional[float] = None):
        self.after_s = after_s
        self.timeout_s = timeout_s
        self._poll_s = poll_s if poll_s is not None else min(5.0, max(after_s / 4, 0.01))
        self._phase: Optional[tuple[str, float]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
        self._thread.start()

    def begin(self, label: str) -> None:
        self._phase = (label, time.monotonic())

    def end(self) -> None:
        self._phase = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        reported: Optional[tuple[str, float]] = None
        next_at = 0.0
        while not self._stop.wait(self._poll_s):
            phase = self._phase
            if phase is None:
                continue
            if phase is not reported:
                reported, next_at = phase, self.after_s
            elapsed = time.monotonic() - phase[1]
            if elapsed >= next_at:
                log.warning(self.message(phase[0], elapsed))
                next_at += self.after_s

    def message(self, label: str, elapsed: float) -> str:
        limit = f" (parallel.collective_timeout_s={self.timeout_s:g})" if self.timeout_s else ""
        now = time.monotonic()
        current, last = _in_flight, _last
        if current is not None:
            where = (f"this rank is in collective '{current[0]}' on {group_label(current[1])} "
                     f"since {_secs(now - current[2])}")
        elif last is not None:
            where = (f"no named collective in flight (the last, '{last[0]}' on "
                     f"{group_label(last[1])}, started {_secs(now - last[2])} ago): the wait is in "
                     f"compute or in torch's own collectives (FSDP2, DTensor)")
        else:
            where = "no named collective started yet"
        return f"{label} has run {_secs(elapsed)}{limit}; {where}"
