"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, committed atomically, keep-last-k.

Layout: <dir>/step_<8 digits>/ holds a committed checkpoint (DCP files plus a COMMITTED marker).
A checkpoint is written under <dir>/.tmp_step_<8 digits>/ and renamed when complete, so a crash
mid-write never leaves a directory that looks committed; leftovers of such crashes are removed.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STEP_DIR = re.compile(r"^step_(\d{8})$")
MARKER = "COMMITTED"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def committed_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Committed checkpoint directories, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    found = committed_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _extra_key() -> str:
    return f"extra_rank{dist.get_rank() if dist.is_initialized() else 0}"


def training_state(model, optimizer, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The state DCP saves and loads in place: model and optimizer (sharding-aware), plus this
    rank's `extra` (scheduler, step, RNG and data-loader states), pickled into one bytes value so
    that DCP stores it verbatim rather than flattening Python tuples and lists."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, _extra_key(): pickle.dumps(extra or {})}


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, extra: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Write, commit atomically, then prune to the newest `keep_last` (0 keeps all)."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / f".tmp_{step_dir_name(step)}"
    if _is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(training_state(model, optimizer, extra), checkpoint_id=str(tmp))
    _barrier()
    if _is_main():
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        prune(ckpt_dir, keep_last)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model, optimizer) -> dict[str, Any]:
    """Load into model and optimizer in place; return this rank's saved `extra`."""
    state = training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return pickle.loads(state[_extra_key()])


def load_model_weights(path: str | Path, model) -> None:
    """Only the model's weights (for `train.init_from`): a fresh optimizer and step 0 follow."""
    model_sd, _ = get_state_dict(model, [])
    dcp.load({"model": model_sd}, checkpoint_id=str(path))
    set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})


def prune(ckpt_dir: Path, keep_last: int) -> None:
    for leftover in ckpt_dir.glob(".tmp_step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last > 0:
        for old in committed_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
