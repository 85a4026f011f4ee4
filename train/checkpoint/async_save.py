"""Asynchronous checkpoints (`checkpoint.async=true`): the step pays for a copy of the state into
host memory; writing, checksumming and committing run on a background thread while training goes
on. At most one save is in flight: the next save (and the end of the run) first waits for it.

The background thread talks to the other ranks over a process group of its own (gloo), so its
collectives (DCP's plan exchange, the checksum gather) never interleave with the training step's on
the default group. A crash or kill during the write leaves only .tmp_step_N, which is not a
checkpoint (train/checkpoint/commit.py); an error in the thread is raised by the next wait().
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from train.checkpoint.save_load import (DiskFullError, check_space, checkpoint_state, prepare_dir,
                                        write_and_commit)

log = logging.getLogger("train.checkpoint")


def stage_to_host(obj: Any) -> Any:
    """A copy of a state dict whose tensors live in (fresh) host memory; DTensors stay DTensors
    with the same mesh, placements and global shape, so DCP plans the same files."""
    if isinstance(obj, DTensor):
        local = obj.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                  shape=obj.shape, stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: stage_to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(stage_to_host(v) for v in obj)
    return obj


class AsyncCheckpointer:
    def __init__(self, timeout_s: float = 600) -> None:
        """timeout_s: how long the background collectives wait for a dead peer."""
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
                       if dist.is_initialized() else None)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._step: Optional[int] = None
        self.staging_s = 0.0

    def save(self, ckpt_dir: Path, step: int, model, optimizer, extra: dict[str, Any],
             keep_last: int) -> None:
        """Stage this step's state and start writing it; returns once the copy is taken."""
        self.wait()
        t0 = time.perf_counter()
        prepare_dir(ckpt_dir, step)
        state = checkpoint_state(model, optimizer, extra)
        check_space(state, ckpt_dir, step)  # before the copy: a full disk stops the run here
        staged = stage_to_host(state)
        self.staging_s = time.perf_counter() - t0
        self._step = step
        self._thread = threading.Thread(target=self._write, name=f"checkpoint-step-{step}",
                                        args=(staged, ckpt_dir, step, keep_last), daemon=True)
        self._thread.start()

    def _write(self, staged, ckpt_dir: Path, step: int, keep_last: int) -> None:
        try:
            path = write_and_commit(staged, ckpt_dir, step, keep_last, group=self._group)
            log.info("checkpoint committed: %s (written in the background)", path)
        except BaseException as e:  # re-raised on the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, DiskFullError):  # its message says what to do
                raise err
            raise RuntimeError(f"the asynchronous checkpoint of step {self._step} failed: {err}") from err

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
