"""Data config: an OmegaConf structured config (primitive / Optional / dict-of-dataclass fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

SOURCES = ("synthetic_text", "webdataset")
VISION_DEFAULTS = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}


@dataclass
class SourceConfig:
    """One source of a mixture: its shards and its sampling weight (documents are drawn by weight)."""

    shards: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    name: str = "synthetic_text"  # document source, one of SOURCES
    tokenizer: Optional[str] = None  # path to a tokenizer.json; None = shipped smoke tokenizer
    seq_len: int = 256  # tokens per packed row
    batch_size: int = 8  # micro-batch rows per data-parallel rank
    # Rows per optimizer step over all data-parallel ranks; when set, data.batch_size is derived
    # from it (global / (data-parallel size x train.grad_accum)), so a resized job keeps it.
    # None = data.batch_size x data-parallel size x train.grad_accum.
    global_batch_size: Optional[int] = None
    # Deterministic reader + packer streams the rows come from (data/loader.py); fixed by the
    # config, not the layout: a multiple of every data-parallel size the job may run at.
    virtual_streams: int = 64
    seed: int = 1234  # selects the document stream (synthetic text) / the shuffles (webdataset)
    # Documents in the whole stream (over all ranks); None = infinite. A finite stream ends with a
    # padded row and, if needed, all-padding rows so the last batch keeps its [B, T] shape.
    num_docs: Optional[int] = None
    start_doc: int = 0  # first document index; e.g. a held-out eval stream starts far away

    # ---- webdataset (data/README section "Data" of the top README) ----
    # One source: local paths, globs, brace ranges or URLs webdataset opens (pipe:, http:), several
    # joined by "::". A mixture: `sources` (name -> {shards, weight}) instead.
    shards: Optional[str] = None
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    # Write learnable synthetic shards (data/synthetic.py, seed data.seed) into the directory of
    # `shards` when it matches no file: the smoke run's first start.
    generate_synthetic: bool = False
    num_workers: int = 0  # DataLoader worker processes per rank (0 = in the training process)
    prefetch_factor: int = 2  # chunks of batch_size rows each worker prepares ahead
    shuffle_shards: bool = True  # a new shard order every epoch
    # Samples per shuffle block of each virtual stream; <= 1 keeps the shard order. A process holds
    # a block per stream it runs: virtual_streams / (data-parallel size x workers) of them.
    shuffle_buffer: int = 32
    epochs: Optional[int] = None  # passes over every source; None = endless
    # Resume although the shard list differs from the checkpoint's (same count): the streams
    # continue at the same positions of the new list. Off: such a resume is refused.
    allow_changed_shards: bool = False
    # Samples of one source skipped in a row (bad JSON, undecodable media...) that stop the run
    # with a message naming the source; 0 = never stop.
    max_consecutive_skips: int = 1000
    # Cap on merged visual tokens per packed row; None = seq_len // 2.
    max_visual_tokens: Optional[int] = None
    # null = model.vision's patch_size / temporal_patch_size / spatial_merge_size, filled in by
    # the trainer's config check (train/config.py), which refuses a value that differs from the
    # model's; a standalone loader (no model) gets VISION_DEFAULTS.
    patch_size: Optional[int] = None
    temporal_patch_size: Optional[int] = None
    merge_size: Optional[int] = None
    image_min_pixels: int = 256 * 256  # released Qwen3.5 image budget: smaller images are upscaled
    image_max_pixels: int = 1024 * 1024  # larger images are downscaled (and counted as oversized)
    video_fps: float = 2.0  # frames sampled per second of video
    video_min_frames: int = 4
    video_max_frames: int = 64
    video_min_pixels: int = 128 * 32 * 32  # budget over all sampled frames of a clip
    video_max_pixels: int = 768 * 32 * 32

    def validate(self) -> "DataConfig":
        validate_data_config(self)
        return self

    @property
    def visual_token_cap(self) -> int:
        """Merged visual tokens a packed row may hold: max_visual_tokens, else seq_len // 2."""
        return self.max_visual_tokens if self.max_visual_tokens is not None else self.seq_len // 2

    def shards_field(self, source: str) -> str:
        """The config field that names `source`'s shards, for messages."""
        return f"data.sources.{source}.shards" if self.sources else "data.shards"


def fill_vision_defaults(cfg: DataConfig) -> None:
    """The vision fields left null -> VISION_DEFAULTS (the trainer has set them from model.vision
    before: this is for loaders built without a model)."""
    for fld, default in VISION_DEFAULTS.items():
        if getattr(cfg, fld) is None:
            setattr(cfg, fld, default)


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the field, its value and the rule it breaks. Fills the vision
    fields left null (fill_vision_defaults)."""
    fill_vision_defaults(cfg)
    if cfg.name not in SOURCES:
        raise ValueError(f"data.name={cfg.name!r} must be one of {SOURCES}")
    if cfg.seq_len < 2:
        # one token has no next-token target
        raise ValueError(f"data.seq_len={cfg.seq_len} must be >= 2")
    if cfg.batch_size < 1:
        raise ValueError(f"data.batch_size={cfg.batch_size} must be >= 1")
    if cfg.seed < 0:
        raise ValueError(f"data.seed={cfg.seed} must be >= 0")
    if cfg.num_docs is not None and cfg.num_docs < 1:
        raise ValueError(f"data.num_docs={cfg.num_docs} must be >= 1 or null (infinite)")
    if cfg.start_doc < 0:
        raise ValueError(f"data.start_doc={cfg.start_doc} must be >= 0")
    if cfg.virtual_streams < 1:
        raise ValueError(f"data.virtual_streams={cfg.virtual_streams} must be >= 1")
    if cfg.global_batch_size is not None and cfg.global_batch_size < 1:
        raise ValueError(f"data.global_batch_size={cfg.global_batch_size} must be >= 1 or null "
                         f"(data.batch_size x data-parallel size x train.grad_accum)")
    for fld in ("num_workers", "max_consecutive_skips"):
        if getattr(cfg, fld) < 0:
            raise ValueError(f"data.{fld}={getattr(cfg, fld)} must be >= 0")
    if cfg.name != "webdataset":
        # Shards given to another source would be ignored: the run would train on something else.
        if cfg.shards or cfg.sources:
            given = f"data.shards={cfg.shards!r}" if cfg.shards else f"data.sources={list(cfg.sources)}"
            raise ValueError(f"{given}: shards are read only with data=webdataset "
                             f"(data.name={cfg.name!r} would ignore them); add data=webdataset")
        return
    if bool(cfg.shards) == bool(cfg.sources):
        raise ValueError(f"data.shards={cfg.shards!r} and data.sources={dict(cfg.sources)!r}: "
                         f"data=webdataset needs exactly one of them (one source, or a mixture)")
    for name, src in cfg.sources.items():
        if not src.shards:
            raise ValueError(f"data.sources.{name}.shards={src.shards!r}: must name shards")
        if not src.weight > 0:
            raise ValueError(f"data.sources.{name}.weight={src.weight!r}: must be > 0")
    for fld in ("prefetch_factor", "patch_size", "temporal_patch_size", "merge_size",
                "image_min_pixels", "image_max_pixels", "video_min_frames", "video_max_frames",
                "video_min_pixels", "video_max_pixels"):
        if getattr(cfg, fld) < 1:
            raise ValueError(f"data.{fld}={getattr(cfg, fld)} must be >= 1")
    if cfg.image_min_pixels > cfg.image_max_pixels:
        raise ValueError(f"data.image_min_pixels={cfg.image_min_pixels} must be <= "
                         f"data.image_max_pixels={cfg.image_max_pixels}")
    if cfg.video_min_pixels > cfg.video_max_pixels:
        raise ValueError(f"data.video_min_pixels={cfg.video_min_pixels} must be <= "
                         f"data.video_max_pixels={cfg.video_max_pixels}")
    if cfg.video_fps <= 0:
        raise ValueError(f"data.video_fps={cfg.video_fps} must be > 0")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ValueError(f"data.epochs={cfg.epochs} must be >= 1 or null (endless)")
    if cfg.max_visual_tokens is not None and not 1 <= cfg.max_visual_tokens <= cfg.seq_len:
        raise ValueError(f"data.max_visual_tokens={cfg.max_visual_tokens} must be in "
                         f"[1, data.seq_len={cfg.seq_len}] or null (seq_len // 2)")


def source_specs(cfg: DataConfig) -> dict[str, tuple[str, float]]:
    """name -> (shard spec, weight): the mixture, or the single source named "default"."""
    if cfg.sources:
        return {name: (src.shards, float(src.weight)) for name, src in cfg.sources.items()}
    return {"default": (cfg.shards, 1.0)}
