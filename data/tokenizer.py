"""Thin wrapper over HF ``tokenizers`` plus the trainer of the shipped smoke tokenizer.

The smoke tokenizer is a byte-level BPE trained on the synthetic text (data/synthetic_text.py) and
shipped as ``data/assets/smoke_tokenizer.json``; nothing is downloaded at run time. Regenerate it
(deterministically) with::

    python -m data.tokenizer --out data/assets/smoke_tokenizer.json

A real Qwen ``tokenizer.json`` passed by path loads through the same class.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Reserved from the start so that ids do not move when the multimodal loader starts using them.
SPECIAL_TOKENS = (EOS, PAD, "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen base models end documents with <|endoftext|>; chat-only files may only have <|im_end|>.
EOS_CANDIDATES = (EOS, "<|im_end|>")

SMOKE_TOKENIZER_PATH = Path(__file__).parent / "assets" / "smoke_tokenizer.json"
# The synthetic text has few distinct words, so BPE saturates just below 1024 merges; the rest is
# filled with reserved tokens so the id space is a round, TP- and tensor-core-friendly size.
SMOKE_VOCAB_SIZE = 1024
SMOKE_TRAIN_DOCS = 4000
# Each seed's world draws a subset of the names/cities; several seeds cover all of them.
SMOKE_TRAIN_SEEDS = tuple(range(8))
# Encodings of short strings are kept: video timestamps ("<1.5 seconds>"), and in templated data
# captions and connectives, repeat all the time, and a tokenizer call costs ~10 us however short.
SHORT_TEXT_CHARS = 64
SHORT_TEXT_CACHE = 8192


class Tokenizer:
    """``tokenizers.Tokenizer`` with the ids the data path needs.

    ``encode`` adds no special tokens (no BOS); the packer appends ``eos_id`` to each document.
    Text that literally contains a special token string (e.g. "<|endoftext|>") encodes to that
    special id, as in HF.
    """

    def __init__(self, tok: tokenizers.Tokenizer, path: str | None = None):
        self.tok = tok
        self.path = path
        vocab = tok.get_vocab(with_added_tokens=True)
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise ValueError(
                f"tokenizer {path!r} has none of the end-of-document tokens {EOS_CANDIDATES}"
            )
        self.eos_id: int = vocab[eos]
        # Padding positions carry label -100, so any id works; eos is the usual fallback.
        self.pad_id: int = vocab.get(PAD, self.eos_id)
        # Size of the id space (max id + 1): added tokens can sit above the base vocab.
        self.vocab_size: int = max(vocab.values()) + 1
        self._short: dict[str, tuple[int, ...]] = {}

    def _remember(self, text: str, ids: list[int]) -> None:
        if len(text) <= SHORT_TEXT_CHARS and len(self._short) < SHORT_TEXT_CACHE:
            self._short[text] = tuple(ids)

    def encode(self, text: str) -> list[int]:
        ids = self._short.get(text)
        if ids is not None:
            return list(ids)
        out = self.tok.encode(text, add_special_tokens=False).ids
        self._remember(text, out)
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        tid = self.tok.token_to_id(name)
        if tid is None:
            raise KeyError(f"token {name!r} is not in tokenizer {self.path or '<in-memory>'}")
        return tid

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """Load a ``tokenizer.json`` file; ``None`` -> the shipped smoke tokenizer."""
    path = str(SMOKE_TOKENIZER_PATH) if path is None else os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"data.tokenizer={path!r} is not a file; pass a tokenizer.json path or null for the "
            f"shipped smoke tokenizer"
        )
    return Tokenizer(tokenizers.Tokenizer.from_file(path), path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | None = None) -> Tokenizer:
    """Train a byte-level BPE with the reserved special tokens (ids 0..5); save it if ``out_path``.

    If the merges run out before ``vocab_size`` (a small corpus), the id space is filled up to
    ``vocab_size`` exactly with ``<|reserved_k|>`` special tokens.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    # No prefix space: documents are concatenated verbatim, and the decode must round-trip exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet: any unseen character still encodes (as its bytes).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{k}|>" for k in range(missing)])
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        # Compact JSON keeps the shipped file small.
        Path(out_path).write_text(tok.to_str(pretty=False))
    return Tokenizer(tok, out_path)


def smoke_training_texts(num_docs: int = SMOKE_TRAIN_DOCS) -> list[str]:
    from data.synthetic_text import SyntheticText

    per_seed = num_docs // len(SMOKE_TRAIN_SEEDS)
    out = []
    for seed in SMOKE_TRAIN_SEEDS:
        src = SyntheticText(seed)
        out.extend(src[i] for i in range(per_seed))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="train the smoke byte-level BPE tokenizer")
    ap.add_argument("--out", default=str(SMOKE_TOKENIZER_PATH))
    ap.add_argument("--vocab-size", type=int, default=SMOKE_VOCAB_SIZE)
    ap.add_argument("--num-docs", type=int, default=SMOKE_TRAIN_DOCS)
    args = ap.parse_args()
    tok = train_tokenizer(smoke_training_texts(args.num_docs), args.vocab_size, args.out)
    print(f"wrote {args.out}: vocab_size={tok.vocab_size} eos_id={tok.eos_id} pad_id={tok.pad_id}")


if __name__ == "__main__":
    main()
