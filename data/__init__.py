"""Data path: webdataset shards (or synthetic text) -> tokenize -> pack -> resumable batches.

`build_loader(cfg, dp_rank, dp_world)` picks the loader by `data.name`."""

from data.config import DataConfig, SourceConfig, validate_data_config
from data.packing import IGNORE_INDEX, Packer, PackedRow, collate
from data.synthetic_text import SyntheticText, synthetic_document
from data.loader import build_loader
from data.text_loader import TextLoader
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
    "TextLoader",
    "build_loader",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
]
