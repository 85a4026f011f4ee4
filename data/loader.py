"""The one entry point the trainer uses: ``build_loader(cfg, dp_rank, dp_world)`` by ``data.name``."""

from __future__ import annotations

from data.config import DataConfig, validate_data_config


def build_loader(cfg: DataConfig, dp_rank: int = 0, dp_world: int = 1):
    """An iterator of batches with ``state_dict()`` / ``load_state_dict()`` for data-parallel rank
    ``dp_rank`` of ``dp_world``: ``synthetic_text`` -> data/text_loader.py, ``webdataset`` ->
    data/webdataset_loader.py. Shard specs are checked here, at start-up."""
    validate_data_config(cfg)
    if cfg.name == "webdataset":
        from data.webdataset_loader import WebDatasetLoader

        return WebDatasetLoader(cfg, dp_rank, dp_world)
    from data.text_loader import build_loader as build_text_loader

    return build_text_loader(cfg, dp_rank, dp_world)
