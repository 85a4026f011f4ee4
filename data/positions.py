"""M-RoPE positions of one document, computed once when the document is built.

The rule is model/mrope.py's `mrope_position_ids` (the readable reference, which the tests compare
against): text takes a running index; a visual block of merged grid (t', h', w') whose first pad
sits where the running index is s takes (s + k, s + i, s + j); the text after it continues at
s + max(t', h', w'). Here a document's blocks are known from its layout, so the positions are a
few numpy slices per block instead of a pass over every packed batch, and the packer can cut a
document and reuse them: positions are translation-equivariant, so a piece that starts at token c
(never inside a visual item) is the whole document's positions from c minus the position at c.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=256)
def block_offsets(shape: tuple[int, int, int]) -> np.ndarray:
    """(t', h', w') -> [3, t'*h'*w'] int64 (k, i, j) of each pad, in token order (t, then h, then w)."""
    out = np.indices(shape, dtype=np.int64).reshape(3, -1)
    out.setflags(write=False)
    return out


def document_positions(num_tokens: int, blocks: list[tuple[int, tuple[int, int, int]]]) -> np.ndarray:
    """Positions [3, num_tokens] int64 (rows t, h, w) of a document whose visual blocks are
    ``blocks``: (index of the block's first pad, merged grid (t', h', w')), in token order."""
    pos = np.empty((3, num_tokens), dtype=np.int64)
    shift = prev = 0  # shift: how far the running index lags the token index after the blocks so far
    for start, shape in blocks:
        pos[:, prev:start] = np.arange(prev - shift, start - shift)
        off = block_offsets(shape)
        end = start + off.shape[1]
        pos[:, start:end] = off + (start - shift)
        shift += off.shape[1] - max(shape)
        prev = end
    pos[:, prev:] = np.arange(prev - shift, num_tokens - shift)
    return pos


def piece_positions(positions: np.ndarray, cut: int) -> np.ndarray:
    """The positions of the piece from token ``cut`` on, as if it were a document of its own."""
    tail = positions[:, cut:]
    return tail - tail[0, 0] if tail.shape[1] else tail
