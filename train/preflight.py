"""Start-up checks of what the run will read and write, before any model or process group exists:
a missing shard, tokenizer or checkpoint, or a directory that cannot be written, fails in seconds
with one line, not with a traceback after the model was built (or, for the checkpoint directory,
after the first `checkpoint.interval` steps). Also removes the temporary directories of checkpoint
saves that a crash (or a full disk) cut off, so that a restart after freeing space works."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from model.config import ConfigError
from train import checkpoint as ckpt
from train.config import RootConfig

log = logging.getLogger("train")


def checkpoint_dir(cfg: RootConfig) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")


def check_inputs(cfg: RootConfig) -> None:
    """Every path the run reads exists: shards, tokenizer, resume and init checkpoints."""
    d = cfg.data
    if d.name == "webdataset" and not d.generate_synthetic:  # generate_synthetic writes them
        from data.config import source_specs
        from data.shards import URL, expand_shards

        for name, (spec, _) in source_specs(d).items():
            field = d.shards_field(name)
            try:
                urls = expand_shards(spec, field)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            for path in (u for u in urls if not URL.match(u)):  # pipe:, s3: ... open when read
                if not os.path.isfile(path) or not os.access(path, os.R_OK):
                    raise ConfigError(f"{field}={spec!r}: shard {path!r} is not a readable file")
    if d.tokenizer:
        from data.tokenizer import load_tokenizer

        if not os.path.isfile(os.path.expanduser(d.tokenizer)):  # as load_tokenizer reads it
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: no such file")
        try:
            load_tokenizer(d.tokenizer)
        except Exception as e:  # noqa: BLE001 - any failure to load is the same user error
            raise ConfigError(f"data.tokenizer={d.tokenizer!r}: cannot be loaded: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    t = cfg.train
    if t.resume not in ("auto", "never") and not (Path(t.resume) / ckpt.MARKER).is_file():
        why = "no such directory" if not Path(t.resume).is_dir() else f"no {ckpt.MARKER} file in it"
        raise ConfigError(f"train.resume={t.resume!r}: not a committed checkpoint ({why}); use "
                          f"auto, never or a checkpoints/step_N directory")
    if t.init_from and not (Path(t.init_from) / ".metadata").is_file():
        why = "no such directory" if not Path(t.init_from).is_dir() else "no .metadata file in it"
        raise ConfigError(f"train.init_from={t.init_from!r}: not a checkpoint ({why})")


def check_writable(field: str, directory: Path) -> None:
    """Create `directory` and write, sync and delete a probe file in it."""
    probe = directory / f".write_probe_{socket.gethostname()}_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{field}={str(directory)!r}: cannot write there "
                          f"({type(e).__name__}: {e.strerror or e})") from None


def preflight(cfg: RootConfig) -> None:
    """The checks above; raises ConfigError with one line. Every rank checks: each may see other
    files (node-local disks)."""
    check_writable("run_dir", Path(cfg.run_dir))
    check_writable("checkpoint.dir" if cfg.checkpoint.dir else "run_dir (its checkpoints/)",
                   checkpoint_dir(cfg))
    check_inputs(cfg)
