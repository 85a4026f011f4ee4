"""Synthetic text as a source of the shard pipeline: the raw samples of one virtual stream.

Stream v of V reads documents ``start_doc + v + k*V`` for k = 0, 1, 2, ... (data/synthetic_text.py:
document i is a pure function of (seed, i)), as plain-text samples ``{"txt": bytes}``, the layout
data/format.py reads as ``[text]``. Same interface as data/shards.py's ShardStream: ``next()`` ->
raw sample or None when a finite stream (``num_docs``) has ended; the state is k.
"""

from __future__ import annotations

from typing import Any, Optional

from data.synthetic_text import SyntheticText


class SyntheticTextStream:
    def __init__(self, seed: int, stream: int, num_streams: int, start_doc: int = 0,
                 num_docs: Optional[int] = None):
        self.text = SyntheticText(seed)
        self.stream, self.num_streams = stream, num_streams
        self.start, self.end = start_doc, None if num_docs is None else start_doc + num_docs
        self.k = 0  # documents this stream has read

    def next(self) -> Optional[dict[str, Any]]:
        i = self.start + self.stream + self.k * self.num_streams
        if self.end is not None and i >= self.end:
            return None
        self.k += 1
        return {"__key__": f"doc{i}", "__url__": "synthetic_text", "txt": self.text[i].encode()}

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.k = int(sd["k"])
