"""Entry point: `python -m train.main [experiment=NAME] [group=option] [key=value ...]`.

Composes the Hydra config tree under configs/, checks it (types, unknown keys, cross-field rules),
writes the resolved config into the run directory and trains. A bad config stops here with one
line naming the field, the value and the rule, before any model, process group or file exists.
Flags: --cfg prints the resolved config and exits; --help lists the config groups.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import ConfigError
from train.config import RootConfig, apply_aliases, register_configs, unknown_keys, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("train")


def quote_brace_values(overrides: list[str]) -> list[str]:
    """`data.shards=DIR/shard-{000000..000009}.tar` as typed in a shell (which strips the quotes)
    is a syntax error to Hydra, whose grammar reads braces as a dict: quote such values back.
    Values that are already quoted, dicts, lists or interpolations are left alone."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if (sep and ("{" in value or "}" in value) and "${" not in value
                and not value.startswith(("{", "[", "'", '"'))):
            item = f"{key}='{value}'"
        out.append(item)
    return out


def load_config(overrides: list[str]) -> RootConfig:
    """Compose configs/config.yaml with `overrides`; raise ConfigError on any invalid value."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name="config",
                               overrides=apply_aliases(quote_brace_values(overrides)))
        unknown = unknown_keys(OmegaConf.to_container(composed, resolve=False), RootConfig)
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a config field (the schema, train/config.py and the "
                          f"groups' schemas, has no such key; a '+' override adds only known keys)"
                          + (f"; also unknown: {', '.join(unknown[1:])}" if unknown[1:] else ""))
    try:
        return validate_config(cfg)
    except ValueError as e:  # data/ raises plain ValueError with the same kind of message
        raise ConfigError(str(e)) from None


def _one_line(e: BaseException) -> str:
    """Hydra and OmegaConf spread a message over several lines and a chain of causes (the override,
    then the key and the reason); fold them into one line with the key and the reason."""
    lines: list[str] = []
    while e is not None:
        for ln in str(e).splitlines():
            ln = ln.strip()
            if ln and ln not in lines and not ln.startswith(
                    ("object_type=", "reference_type=", "Set the environment", "Config search path",
                     "provider=", "To append", "invalid literal")) and "$VALUE" not in ln:
                lines.append(ln)
        e = e.__cause__ or e.__context__
    return " | ".join(lines)


def memory_error(cfg: RootConfig) -> str | None:
    """One line if this run's worst rank (parallel/memory.py) would not fit the device's memory,
    naming the estimate, the memory and layouts that fit; None when it fits. Runs before any
    process group or model exists: a model that cannot fit stops in seconds, not in the allocator."""
    from parallel.layout import validate_layout
    from parallel.memory import GIB, device_memory_bytes, spec_from_config, worst_rank
    from train.precision import resolve_device

    device = resolve_device(cfg.train.device).type
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = validate_layout(cfg.parallel, cfg.model, world, cfg.data.seq_len,
                             grad_accum=cfg.train.grad_accum)
    spec = spec_from_config(cfg, device)
    est = worst_rank(cfg.model, layout, spec)
    gib = cfg.train.device_memory_gib
    limit = gib * GIB if gib is not None else device_memory_bytes(device)
    if est.peak_bytes <= limit:
        return None
    from parallel.suggest import one_meta_build

    with one_meta_build():
        return _memory_message(cfg, est, layout, world, limit, gib, device, spec)


def _memory_message(cfg, est, layout, world, limit, gib, device, spec) -> str:
    from parallel.memory import GIB
    from parallel.suggest import min_world_hint, suggest_layouts

    fits = suggest_layouts(cfg.model, world, limit / GIB, cfg.data.seq_len, cfg.data.batch_size,
                           spec, base=cfg.parallel, grad_accum=cfg.train.grad_accum)
    if fits:
        hint = f"layouts of these {world} ranks that fit: " + "; ".join(
            f"{s.overrides()} ({s.memory.peak_bytes / GIB:.1f} GiB)" for s in fits[:3])
    else:
        hint = (f"no layout of {world} rank(s) fits; "
                + min_world_hint(cfg.model, limit / GIB, cfg.data.seq_len, cfg.data.batch_size, spec)
                + " (or lower data.batch_size / data.seq_len, parallel.activation_checkpoint=full)")
    where = "train.device_memory_gib" if gib is not None else f"the {device} device's total"
    return (f"model={cfg.model.name}: the estimated peak per rank is {est.summary()}, more than "
            f"{limit / GIB:.1f} GiB ({where}; layout pp={layout.pp} dp_shard={layout.dp_shard} "
            f"tp={layout.tp} ep={layout.ep} activation_checkpoint="
            f"{cfg.parallel.activation_checkpoint}, data.batch_size={cfg.data.batch_size}, "
            f"data.seq_len={cfg.data.seq_len}); {hint}")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs INFO to stdout and <run_dir>/train.log; other ranks only warnings, to stdout."""
    fmt = logging.Formatter(f"%(asctime)s {'' if rank == 0 else f'[rank {rank}] '}%(levelname)s "
                            f"%(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(__doc__)
        print("config groups:", ", ".join(sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())))
        for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
            print(f"  {group.name}: {', '.join(sorted(f.stem for f in group.glob('*.yaml')))}")
        return 0
    show = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if show:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0

    error = memory_error(cfg)
    if error:
        print(f"config error: {error}", file=sys.stderr)
        return 2

    from train.checkpoint import remove_unfinished
    from train.preflight import checkpoint_dir, preflight

    try:
        preflight(cfg)  # paths read and directories written, before anything is built
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run_dir)
    rank = int(os.environ.get("RANK", "0"))  # torchrun sets it; the process group starts later
    # config.yaml is written by the trainer once the resume is accepted: a refused resume leaves it.
    setup_logging(run_dir, rank)
    if rank == 0:
        remove_unfinished(checkpoint_dir(cfg))
    from data.format import DataError
    from train.checkpoint import DiskFullError
    from train.preempt import Stopped
    from train.trainer import Trainer  # heavy imports only once the config is known to be good

    try:
        Trainer(cfg, run_dir).fit()
    except DiskFullError as e:
        log.error("%s", e)
        return 1
    except DataError as e:
        # From a DataLoader worker the message carries the worker's traceback: its last line.
        log.error("%s", str(e).strip().splitlines()[-1].removeprefix("data.format.DataError: "))
        return 1
    except ConfigError as e:  # found once the checkpoint is read (e.g. another shard list)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        log.warning("%s", e)
        return 128 + e.signum  # the shell's code for "ended by this signal"
    return 0


if __name__ == "__main__":
    sys.exit(main())
