"""Data path. Interim: synthetic text -> byte-level BPE -> packed rows (data/text_loader.py)."""

from data.config import DataConfig, validate_data_config
from data.packing import IGNORE_INDEX, Packer, PackedRow, collate
from data.synthetic_text import SyntheticText, synthetic_document
from data.text_loader import TextLoader, build_loader
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "DataConfig",
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
