"""Data config: an OmegaConf structured config (primitive / Optional fields only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SOURCES = ("synthetic_text",)


@dataclass
class DataConfig:
    name: str = "synthetic_text"  # document source, one of SOURCES
    tokenizer: Optional[str] = None  # path to a tokenizer.json; None = shipped smoke tokenizer
    seq_len: int = 256  # tokens per packed row
    batch_size: int = 8  # micro-batch rows per data-parallel rank
    seed: int = 1234  # selects the document stream
    # Documents in the whole stream (over all ranks); None = infinite. A finite stream ends with a
    # padded row and, if needed, all-padding rows so the last batch keeps its [B, T] shape.
    num_docs: Optional[int] = None
    start_doc: int = 0  # first document index; e.g. a held-out eval stream starts far away

    def validate(self) -> "DataConfig":
        validate_data_config(self)
        return self


def validate_data_config(cfg: DataConfig) -> None:
    """Raise ValueError naming the field, its value and the rule it breaks."""
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
