"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, committed atomically, keep-last-k.

Layout: <dir>/step_<8 digits>/ holds a committed checkpoint (DCP files plus the COMMITTED commit
record with every file's checksum, train/checkpoint/commit.py). A checkpoint is written under
<dir>/.tmp_step_<8 digits>/ and renamed when complete, so a crash mid-write never leaves a
directory that looks committed; leftovers of such crashes are removed. Resume verifies the
checksums, and a damaged newest checkpoint is moved aside (damaged_step_N) in favour of the newest
good one. A checkpoint holding a `KEEP` file (the last one before a run of skipped non-finite
steps) is never pruned.

Loading onto another parallel layout (tp, ep, pp, dp_shard, world size): DCP reshards the model's
and the optimizer's DTensors by their global shapes. The optimizer state is saved *flattened*, keyed
by parameter name (`state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`), because the optimizer's groups
are split by mesh (train/optim.py) and so differ between layouts; per-group lists would not map.
Each rank's `extra` (`extra_rank<N>`) is kept, with a `layout` record of which data-parallel rank
each writer was: a rank of the new layout resumes from an old rank of its own data-parallel rank, and
when the data-parallel size changed it gets every old data-parallel rank's extra to remap from.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from train.checkpoint.commit import (MARKER, check_files, checksum_files, fsync_dir, own_files,
                                     read_record, write_record)

log = logging.getLogger("train.checkpoint")
STEP_DIR = re.compile(r"^step_(\d{8})$")
KEEP = "KEEP"
DAMAGED_PREFIX = "damaged_"
LAYOUT_KEY = "layout"
FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)
# Checkpoints written before the flattened format keep per-group lists: loadable in the same layout.
GROUPED_OPTIM_KEY = "optim.param_groups.0.params"


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


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _extra_key(rank: Optional[int] = None) -> str:
    return f"extra_rank{_rank_world()[0] if rank is None else rank}"


def training_state(model, optimizer, extra: Optional[dict[str, Any]] = None,
                   options: StateDictOptions = FLAT_OPTIM) -> dict[str, Any]:
    """The state DCP saves and loads in place: model and optimizer (sharding-aware), plus this
    rank's `extra` (scheduler, step, RNG and data-loader states), pickled into one bytes value so
    that DCP stores it verbatim rather than flattening Python tuples and lists."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd, _extra_key(): pickle.dumps(extra or {})}


def _gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one all-gather; [obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _layout_record(extra: dict[str, Any]) -> bytes:
    """{world, dp_size, dp_ranks: the data-parallel rank of every rank}: one small all-gather.
    Every rank writes the same bytes (DCP keeps one copy)."""
    rank, world = _rank_world()
    dp_rank, dp_size = int(extra.get("dp_rank", rank)), int(extra.get("dp_size", world))
    dp_ranks = [dp_rank] * world
    if world > 1:
        dist.all_gather_object(dp_ranks, dp_rank)
    return pickle.dumps({"world": world, "dp_size": dp_size, "dp_ranks": dp_ranks})


class DiskFullError(RuntimeError):
    """A checkpoint did not fit on its disk; the message says where, how much and what to do."""


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors (this rank's shards of DTensors) and byte strings in a state dict."""
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    if isinstance(state, (bytes, bytearray)):
        return len(state)
    return 0


def _disk_full_message(ckpt_dir: Path, step: int, need: int, free: int, cause: str = "") -> str:
    mib = 2 ** 20
    last = latest_checkpoint(ckpt_dir)
    return (f"checkpoint of step {step} does not fit in {ckpt_dir}: about {need / mib:.1f} MiB "
            f"needed, {free / mib:.1f} MiB free{cause}. The unfinished save is removed; free "
            f"space there (or lower checkpoint.keep_last, or set checkpoint.dir) and restart: the "
            f"run resumes from {last if last else 'step 0 (no committed checkpoint yet)'}")


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in the chain. torch's zip writer hides it ("unexpected pos 704 vs 598"),
    so the caller also compares the free space with what the save needed."""
    while e is not None:
        # DCP's CheckpointException carries each rank's error in `failures`.
        text = f"{e} {getattr(e, 'failures', '')}"
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def prepare_dir(ckpt_dir: Path, step: int) -> Path:
    """Rank 0 clears <dir>/.tmp_step_N; every rank returns its path (collective)."""
    tmp = ckpt_dir / f".tmp_{step_dir_name(step)}"
    if _is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return tmp


def check_space(state: dict[str, Any], ckpt_dir: Path, step: int) -> None:
    """Raise DiskFullError on every rank when `state` cannot fit in ckpt_dir: the total of every
    rank's shards (checkpoints live on one shared filesystem) against its free space (collective)."""
    free = shutil.disk_usage(ckpt_dir).free  # each rank sees its own
    ranks = _gather((state_nbytes(state), free))
    need = sum(n for n, _ in ranks)
    if any(f < need for _, f in ranks):
        raise DiskFullError(_disk_full_message(ckpt_dir, step, need, free))


def checkpoint_state(model, optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds: the training state plus the layout record (collective)."""
    state = training_state(model, optimizer, extra)
    state[LAYOUT_KEY] = _layout_record(extra)
    return state


def write_and_commit(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int,
                     group=None) -> Path:
    """Write `state` into .tmp_step_N (prepared by prepare_dir), checksum each rank's own files,
    and let rank 0 write the commit record, rename the directory and prune. Collective over
    `group` (None: the default group); the asynchronous saver runs it on a thread of its own."""
    tmp, final = ckpt_dir / f".tmp_{step_dir_name(step)}", ckpt_dir / step_dir_name(step)
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    try:
        dcp.save(state, checkpoint_id=str(tmp), process_group=group)
    except (Exception, dcp.api.CheckpointException) as e:  # the latter is a BaseException
        free = shutil.disk_usage(ckpt_dir).free
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e) or free < 2 ** 20:
            need = state_nbytes(state) * world  # no collective on a failure path: this rank's x world
            raise DiskFullError(_disk_full_message(ckpt_dir, step, need, free,
                                                   f" (the write failed: {type(e).__name__})")) from e
        raise
    sums = checksum_files(tmp, own_files(tmp, rank))
    gathered = [sums] * world
    if world > 1:
        # .metadata is written by rank 0 after every rank's data: all files exist by now.
        dist.all_gather_object(gathered, sums, group=group)
    if rank == 0:
        write_record(tmp, step, {k: v for part in gathered for k, v in part.items()})
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
        prune(ckpt_dir, keep_last)
    if world > 1:
        dist.barrier(group=group)
    return final


def save_checkpoint(ckpt_dir: str | Path, step: int, model, optimizer, extra: dict[str, Any],
                    keep_last: int = 0) -> Path:
    """Write, commit atomically with checksums, then prune to the newest `keep_last` (0 keeps all).
    Raises DiskFullError (on every rank) when the checkpoint does not fit: checked before writing,
    against the total of every rank's shards, and again if the write itself fails."""
    ckpt_dir = Path(ckpt_dir)
    prepare_dir(ckpt_dir, step)
    state = checkpoint_state(model, optimizer, extra)
    check_space(state, ckpt_dir, step)
    return write_and_commit(state, ckpt_dir, step, keep_last)


def weights_finite(model) -> bool:
    """Whether every rank's parameters are all finite (collective: every rank gets the answer)."""
    ok = bool(torch.stack([torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()
                           for p in model.parameters()]).all())  # one host read, not one per tensor
    if dist.is_initialized():
        device = next(model.parameters()).device
        flag = torch.tensor([1.0 if ok else 0.0],
                            device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item() == 1.0)
    return ok


# ---- verification and fallback ------------------------------------------------------------------

def verify_checkpoint(path: Path) -> Optional[list[str]]:
    """The problems of a committed checkpoint ([] when every file matches its commit record; None
    when the record predates checksums). Collective: each rank checks a share of the files."""
    rank, world = _rank_world()
    try:
        record = read_record(path)
        files = sorted(record["files"].items()) if record else []
        problems = check_files(path, dict(files[rank::world]))
    except (OSError, ValueError) as e:
        record, problems = {}, [f"{MARKER}: {e}"]
    if world > 1:
        everyone: list = [None] * world
        dist.all_gather_object(everyone, problems)
        problems = sorted({p for part in everyone for p in part})
    return None if record is None else problems


def resumable_checkpoint(ckpt_dir: Path) -> Optional[Path]:
    """The newest committed checkpoint that verifies. A damaged one is reported, naming its bad
    files, and renamed to damaged_step_N (out of resume's and pruning's way, kept for a look);
    the previous one is tried next. Collective."""
    for path in reversed(committed_checkpoints(ckpt_dir)):
        problems = verify_checkpoint(path)
        if problems is None:
            log.warning("%s has no checksums (written by an older version): resuming unverified", path)
            return path
        if not problems:
            log.info("checkpoint %s verified (%s)", path.name, "checksums of every file match")
            return path
        aside = path.parent / f"{DAMAGED_PREFIX}{path.name}"
        log.error("checkpoint %s is damaged: %s; moved to %s; falling back to the previous "
                  "committed checkpoint", path, "; ".join(problems), aside.name)
        _barrier()
        if _is_main():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        _barrier()
    return None


def check_model_matches(path: Path, model, meta=None) -> None:
    """Refuse (ValueError naming the parameter) a checkpoint whose model state has keys this model
    lacks, lacks keys it has, or holds another global shape: DCP would drop the first silently.
    FP8 scaling state (`fp8_*`, `_extra_state`) is the precision config's business, not checked.
    Collective: the keys held by no rank are the extra ones (a pipeline stage holds only its own)."""
    meta = meta if meta is not None else dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    ours = {k: v for k, v in get_state_dict(model, [])[0].items()}
    saved = {k[len("model."):]: m for k, m in meta.items() if k.startswith("model.")}

    def ignorable(k: str) -> bool:
        return "fp8_" in k or k.endswith("_extra_state")

    everyone = set(ours)
    if dist.is_initialized() and dist.get_world_size() > 1:  # pipeline stages hold parts of it
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sorted(ours))
        everyone = {k for part in parts for k in part}
    extra = sorted(k for k in saved if k not in everyone and not ignorable(k))
    missing = sorted(k for k in ours if k not in saved and not ignorable(k))
    hint = "resume with the model config the checkpoint was written with, or start a new run_dir"
    if extra:
        raise ValueError(f"checkpoint {path} does not match the model: it holds model.{extra[0]} "
                         f"({len(extra)} parameter(s) in all) that this model does not have; {hint}")
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: it lacks model.{missing[0]} "
                         f"({len(missing)} parameter(s) in all); {hint}")
    for k, t in ours.items():
        size = getattr(saved[k], "size", None) if k in saved else None
        if isinstance(t, torch.Tensor) and size is not None and tuple(size) != tuple(t.shape):
            raise ValueError(f"checkpoint {path} does not match the model: model.{k} has shape "
                             f"{tuple(size)} there, {tuple(t.shape)} here; {hint}")


def load_checkpoint(path: str | Path, model, optimizer, dp_rank: int = 0,
                    dp_size: int = 1) -> dict[str, Any]:
    """Load into model and optimizer in place, resharding to this layout; return the `extra` this
    rank resumes from: its own when the checkpoint has it and the data-parallel rank is the same,
    else that of an old rank with this data-parallel rank (tp/ep/pp ranks of one dp rank hold the
    same data position). When the data-parallel size changed, the extra of old dp rank 0 is returned
    with `dp_extras`: the extras of every old dp rank, in dp-rank order, to remap the loader from."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    check_model_matches(Path(path), model, meta)
    grouped = GROUPED_OPTIM_KEY in meta
    saved_groups = sum(1 for k in meta if k.startswith("optim.param_groups.") and k.endswith(".params"))
    if grouped and saved_groups != len(optimizer.param_groups):
        raise ValueError(f"{path}: its optimizer state is in the per-group format of older "
                         f"checkpoints ({saved_groups} groups, this layout has "
                         f"{len(optimizer.param_groups)}); it loads only in the layout it was "
                         f"written with")
    record = _read_objects(path, [LAYOUT_KEY])[LAYOUT_KEY] if LAYOUT_KEY in meta else None
    sources = _extra_sources(record, meta, dp_rank, dp_size, path)
    options = StateDictOptions(flatten_optimizer_state_dict=not grouped)
    state = training_state(model, optimizer, options=options)
    del state[_extra_key()]
    state.update({_extra_key(r): b"" for r in sources})
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=options)
    extras = [pickle.loads(state[_extra_key(r)]) for r in sources]
    if record is None or record["dp_size"] == dp_size:
        return extras[0]
    return {**extras[0], "dp_extras": extras}


def _extra_sources(record: Optional[dict], meta, dp_rank: int, dp_size: int, path) -> list[int]:
    """The old ranks whose extras this rank needs: one of its own dp rank, or (dp size changed) one
    per old dp rank."""
    rank, _ = _rank_world()
    if record is None:  # written before layout records: only the same layout resumes
        if _extra_key(rank) not in meta:
            raise ValueError(f"{path} has no {_extra_key(rank)} and no layout record: a checkpoint "
                             f"of this age resumes only with the world size it was written with")
        return [rank]
    firsts: dict[int, int] = {}
    for r, d in enumerate(record["dp_ranks"]):
        firsts.setdefault(d, r)
    if record["dp_size"] != dp_size:
        return [firsts[d] for d in range(record["dp_size"])]
    if rank < record["world"] and record["dp_ranks"][rank] == dp_rank:
        return [rank]
    return [firsts[dp_rank]]


def _read_objects(path: str | Path, keys: list[str]) -> dict[str, Any]:
    state = {k: b"" for k in keys}
    dcp.load(state, checkpoint_id=str(path))
    return {k: pickle.loads(v) for k, v in state.items()}


def load_model_weights(path: str | Path, model) -> None:
    """Only the model's weights (for `train.init_from`): a fresh optimizer and step 0 follow."""
    model_sd, _ = get_state_dict(model, [])
    dcp.load({"model": model_sd}, checkpoint_id=str(path))
    set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})


def remove_unfinished(ckpt_dir: Path) -> None:
    """Remove `.tmp_step_*` left by a save that did not finish (crash, kill, full disk): they are
    never resumed from and may hold the space the next save needs."""
    for tmp in sorted(ckpt_dir.glob(".tmp_step_*")):
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("removed %s, an unfinished checkpoint save", tmp)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Remove crash leftovers and all but the newest `keep_last` committed checkpoints, except
    those protected by a KEEP file (see protect_latest)."""
    remove_unfinished(ckpt_dir)
    if keep_last > 0:
        for old in committed_checkpoints(ckpt_dir)[:-keep_last]:
            if not (old / KEEP).exists():
                shutil.rmtree(old, ignore_errors=True)


def protect_latest(ckpt_dir: Path, before_step: int) -> Optional[Path]:
    """Mark the newest committed checkpoint of a step < before_step as never to be pruned (rank 0
    writes a KEEP file into it): the last one before a run of skipped non-finite steps, so that a
    diverging run can be rolled back from its own directory whatever checkpoint.keep_last says."""
    older = [p for p in committed_checkpoints(ckpt_dir)
             if int(STEP_DIR.match(p.name).group(1)) < before_step]
    if not older:
        return None
    if _is_main() and not (older[-1] / KEEP).exists():
        (older[-1] / KEEP).write_text(f"the last checkpoint before the non-finite step {before_step}; "
                                      f"delete this file to let checkpoint.keep_last prune it\n")
    return older[-1]


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
