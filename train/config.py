"""The run's configuration schema (Hydra structured configs) and its cross-field checks.

Each group's dataclass is registered in Hydra's ConfigStore; the YAML files under configs/ are merged
onto these schemas, so a wrong type or an unknown key fails at composition. `validate_config` then
checks the rules that span fields. Both run before any model, process group or file is created.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from data.config import DataConfig
from model.config import ConfigError, ModelConfig
from parallel.config import ParallelConfig
from parallel.layout import validate_layout
from train.fp8_config import PrecisionConfig, validate_precision


@dataclass
class TrainConfig:
    max_steps: int = 100
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 3e-3
    vision_lr_scale: float = 1.0        # the vision tower trains at lr * vision_lr_scale
    min_lr_ratio: float = 0.1           # final lr = lr * min_lr_ratio
    warmup_steps: int = 10
    # Horizon of the schedule (cosine end, WSD decay end); null = max_steps. Set it when a run may
    # be stopped early and extended, so that max_steps can change without changing the schedule.
    lr_decay_steps: Optional[int] = None
    schedule: str = "cosine"            # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2     # WSD: share of the steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # max global grad norm; 0 disables clipping
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    autocast: str = "auto"              # auto (bf16 where the device has fast bf16) | bf16 | none
    resume: str = "auto"                # auto (latest committed checkpoint, if any) | never | a path
    init_from: Optional[str] = None     # checkpoint to take model weights from at step 0
    # A Hugging Face directory (config.json + safetensors) to take the weights from at step 0, each
    # rank reading only its shards; with model=from_hf the model config comes from its config.json.
    init_from_hf: Optional[str] = None
    log_interval: int = 1
    peak_flops: Optional[float] = None  # per-device peak for MFU; None: known GPU table or measured
    max_consecutive_bad_steps: int = 5  # non-finite loss/grad steps in a row before stopping
    # End-of-run check of a vision model on this many held-out synthetic documents: caption loss
    # with the images and with noise instead (data/heldout.py); 0 = off.
    heldout_caption_docs: int = 0
    # Memory per device for the launch check (parallel/memory.py estimates each rank's peak; the run
    # stops before building anything if it does not fit); null = the device's total memory.
    device_memory_gib: Optional[float] = None


@dataclass
class CheckpointConfig:
    interval: int = 100                 # steps between checkpoints; 0 disables periodic saves
    keep_last: int = 3                  # committed checkpoints kept; 0 keeps all
    dir: Optional[str] = None           # default: <run_dir>/checkpoints
    save_final: bool = True
    # Stage to host memory and write in the background (`checkpoint.async=true` is accepted too).
    async_save: bool = False


@dataclass
class LoggingConfig:
    wandb: str = "offline"              # online | offline | disabled
    project: str = "qwen35-pretrain"
    run_name: Optional[str] = None


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    run_dir: str = "runs/default"


def unknown_keys(tree: Any, schema: type, prefix: str = "") -> list[str]:
    """Dotted names of the keys of a composed config tree (plain dicts) that `schema` (a
    dataclass) does not declare. Hydra's `+key=value` adds keys past the schema, and turning the
    tree into dataclasses then drops them silently: a `+train.lr_warmup=10` would change nothing."""
    if not isinstance(tree, dict):
        return []
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key, value in tree.items():
        if key not in names:
            out.append(f"{prefix}{key}")
            continue
        kind = hints[key]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (dict, typing.Dict) and len(args) == 2 \
                and dataclasses.is_dataclass(args[1]) and isinstance(value, dict):
            for name, item in value.items():  # e.g. data.sources.<name>
                out += unknown_keys(item, args[1], f"{prefix}{key}.{name}.")
            continue
        inner = kind if dataclasses.is_dataclass(kind) else next(
            (a for a in args if dataclasses.is_dataclass(a)), None)
        if inner is not None:
            out += unknown_keys(value, inner, f"{prefix}{key}.")
    return out


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RootConfig)


def _choice(value, allowed, fld):
    if value not in allowed:
        raise ConfigError(f"{fld}={value!r}: must be one of {', '.join(map(repr, allowed))}")


def data_vision_fields(cfg: RootConfig) -> None:
    """data.patch_size / temporal_patch_size / merge_size from model.vision (one truth: the
    loader's patches must be the tower's); a value set in data that differs is refused."""
    v = cfg.model.vision
    if v is None:
        return
    for fld, model_fld in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                           ("merge_size", "spatial_merge_size")):
        want, got = getattr(v, model_fld), getattr(cfg.data, fld)
        if got is not None and got != want:
            raise ConfigError(f"data.{fld}={got} differs from model.vision.{model_fld}={want}: "
                              f"leave data.{fld} null (it is taken from the model)")
        setattr(cfg.data, fld, want)


def data_batch(cfg: RootConfig, dp: int) -> None:
    """Resolve data.batch_size (the micro-batch per rank) from data.global_batch_size; check that
    the data-parallel ranks split the virtual streams (data/loader.py)."""
    d, accum = cfg.data, cfg.train.grad_accum
    if d.global_batch_size is not None:
        if d.global_batch_size % (dp * accum):
            raise ConfigError(f"data.global_batch_size={d.global_batch_size}: must divide by the "
                              f"data-parallel size x train.grad_accum = {dp} x {accum} = "
                              f"{dp * accum} (rows per micro-batch are whole)")
        d.batch_size = d.global_batch_size // (dp * accum)
    from data.loader import check_layout

    try:
        check_layout(d, dp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
# Command-line spellings that cannot be dataclass fields (`async` is a Python keyword).
OVERRIDE_ALIASES = {"checkpoint.async": "checkpoint.async_save"}
FROM_HF = "from_hf"  # configs/model/from_hf.yaml: the model config of train.init_from_hf's config.json


def apply_aliases(overrides: list[str]) -> list[str]:
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        bare = key.lstrip("+~")
        if sep and bare in OVERRIDE_ALIASES:
            item = f"{key[:len(key) - len(bare)]}{OVERRIDE_ALIASES[bare]}={value}"
        out.append(item)
    return out


def resolve_hf_model(cfg: RootConfig) -> None:
    """train.init_from_hf: take the model config from the directory's config.json (model=from_hf),
    or check the given one against it, naming every field that disagrees."""
    t = cfg.train
    if not t.init_from_hf:
        if cfg.model.name == FROM_HF:
            raise ConfigError("model=from_hf: needs train.init_from_hf=DIR (a Hugging Face "
                              "checkpoint directory whose config.json describes the model)")
        return
    if t.init_from:
        raise ConfigError(f"train.init_from={t.init_from!r} and train.init_from_hf={t.init_from_hf!r}: "
                          f"set one (both give the initial weights)")
    import json

    from model.hf.config_map import TRAINING_FIELDS, hf_to_model_config, model_config_mismatches

    hf_dir = Path(t.init_from_hf)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"train.init_from_hf={t.init_from_hf!r}: no config.json there (expected a "
                          f"Hugging Face checkpoint directory: config.json + *.safetensors)")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    if cfg.model.name == FROM_HF:
        from train.checkpoint.hf_convert import weights_mtp_depth

        derived = hf_to_model_config(hf_config, hf_dir.resolve().name, weights_mtp_depth(hf_dir))
        # Training knobs set on the command line (not at their defaults) win over config.json's.
        default = ModelConfig()
        knobs = {f: getattr(cfg.model, f) for f in TRAINING_FIELDS - {"name"}
                 if getattr(cfg.model, f) != getattr(default, f)}
        cfg.model = dataclasses.replace(derived, **knobs)
        return
    bad = model_config_mismatches(cfg.model, hf_config)
    if bad:
        raise ConfigError(f"train.init_from_hf={t.init_from_hf!r}: model={cfg.model.name!r} disagrees "
                          f"with {hf_dir / 'config.json'}: {'; '.join(bad)} (model=from_hf takes the "
                          f"model from config.json)")


def validate_config(cfg: RootConfig) -> RootConfig:
    """Cross-field rules; raises ConfigError naming the field, the value and the rule."""
    resolve_hf_model(cfg)
    cfg.model.validate("model")
    data_vision_fields(cfg)
    if hasattr(cfg.data, "validate"):
        cfg.data.validate()
    t = cfg.train
    for fld in ("max_steps", "grad_accum", "log_interval"):
        if getattr(t, fld) < 1:
            raise ConfigError(f"train.{fld}={getattr(t, fld)!r}: must be >= 1")
    if t.max_consecutive_bad_steps < 1:
        raise ConfigError(f"train.max_consecutive_bad_steps={t.max_consecutive_bad_steps!r}: must be "
                          f">= 1 (the non-finite steps in a row that stop the run)")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr!r}: must be > 0")
    if t.vision_lr_scale <= 0:
        raise ConfigError(f"train.vision_lr_scale={t.vision_lr_scale!r}: must be > 0")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio!r}: must be in [0, 1]")
    if t.lr_decay_steps is not None and t.lr_decay_steps < 1:
        raise ConfigError(f"train.lr_decay_steps={t.lr_decay_steps!r}: must be >= 1 or null "
                          f"(= train.max_steps)")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps!r}: must be >= 0")
    if t.lr_decay_steps is not None and t.warmup_steps > t.lr_decay_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps!r}: must be <= "
                          f"train.lr_decay_steps={t.lr_decay_steps} (the schedule's horizon)")
    _choice(t.schedule, ("cosine", "wsd", "constant"), "train.schedule")
    if t.schedule == "wsd" and not 0 < t.wsd_decay_fraction <= 1:
        raise ConfigError(f"train.wsd_decay_fraction={t.wsd_decay_fraction!r}: must be in (0, 1]")
    _choice(t.device, ("auto", "cpu", "cuda"), "train.device")
    _choice(t.autocast, ("auto", "bf16", "none"), "train.autocast")
    if t.heldout_caption_docs < 0:
        raise ConfigError(f"train.heldout_caption_docs={t.heldout_caption_docs!r}: must be >= 0")
    if t.heldout_caption_docs and cfg.model.vision is None:
        raise ConfigError(f"train.heldout_caption_docs={t.heldout_caption_docs!r}: needs a model "
                          f"with vision (model={cfg.model.name!r} has model.vision=null)")
    if t.device_memory_gib is not None and not t.device_memory_gib > 0:
        raise ConfigError(f"train.device_memory_gib={t.device_memory_gib!r}: must be > 0, or null "
                          f"(the device's total memory)")
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip!r}: must be >= 0 (0 disables clipping)")
    if t.peak_flops is not None and t.peak_flops <= 0:
        raise ConfigError(f"train.peak_flops={t.peak_flops!r}: must be > 0 or null (measured)")
    c = cfg.checkpoint
    if c.interval < 0:
        raise ConfigError(f"checkpoint.interval={c.interval!r}: must be >= 0 (0 disables)")
    if c.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last={c.keep_last!r}: must be >= 0 (0 keeps all)")
    _choice(cfg.logging.wandb, ("online", "offline", "disabled"), "logging.wandb")
    # The layout against the model and the world size, before any process group (torchrun sets
    # WORLD_SIZE; a plain `python -m train.main` is one process).
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit():
        raise ConfigError(f"WORLD_SIZE={world!r}: must be a positive integer (torchrun sets it)")
    layout = validate_layout(cfg.parallel, cfg.model, int(world), cfg.data.seq_len,
                             grad_accum=t.grad_accum)
    data_batch(cfg, layout.dp)
    if cfg.parallel.pp > 1 and t.heldout_caption_docs:
        raise ConfigError(f"train.heldout_caption_docs={t.heldout_caption_docs}: the held-out caption "
                          f"check runs the whole model in one forward, not through the pipeline; set "
                          f"it to 0 with parallel.pp={cfg.parallel.pp}")
    if cfg.precision.backend == "te":  # the layout, before the checks of this machine's GPU
        from train.fp8_te import te_layout_error  # imports torch, not TE

        error = te_layout_error(cfg.parallel.ep, cfg.precision.grouped_experts, cfg.precision.recipe)
        if error:
            raise ConfigError(error)
    validate_precision(cfg.precision, cfg.model.num_layers, t.device)
    return cfg
