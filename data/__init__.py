"""Data path: sources (webdataset shards, synthetic text) -> virtual streams (tokenize, pack) ->
rows in a fixed global order -> this rank's resumable micro-batches (data/loader.py).

`build_loader(cfg, dp_rank, dp_world)` is the one loader."""

from data.config import DataConfig, SourceConfig, validate_data_config
from data.loader import Loader, build_loader
from data.packing import IGNORE_INDEX, Packer, PackedRow, collate
from data.synthetic_text import SyntheticText, synthetic_document
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
    "SourceConfig",
    "validate_data_config",
    "IGNORE_INDEX",
    "Packer",
    "PackedRow",
    "collate",
    "SyntheticText",
    "synthetic_document",
    "Loader",
    "build_loader",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
]
