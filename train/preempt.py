"""Stop requests: SIGTERM (what Slurm and Kubernetes send before killing a job) and SIGINT (Ctrl-C)
end the run at the end of the current step, after a checkpoint, instead of losing the steps since
the last periodic one. A second SIGINT stops at once (the default KeyboardInterrupt)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from parallel import collectives

log = logging.getLogger("train")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The run stopped on a signal after committing a checkpoint; main() exits 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}: checkpoint {checkpoint} committed; "
                         f"the same command (train.resume=auto) resumes from it")


class StopRequest:
    """Records the first stop signal; `agreed()` says whether any rank got one (one all-reduce)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the step
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: stopping after this step with a checkpoint",
                        signal.Signals(signum).name)

    def agreed(self, device: torch.device) -> Optional[int]:
        """The signal any rank received (the largest number), or None; equal on all ranks, so all
        of them save and stop after the same step."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.signum
        t = torch.tensor([self.signum or 0], dtype=torch.int64,
                         device=device if device.type == "cuda" else "cpu")
        collectives.all_reduce(t, "trainer all_reduce of stop requests (SIGTERM/SIGINT)",
                               op=dist.ReduceOp.MAX)
        return int(t.item()) or None
