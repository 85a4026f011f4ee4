"""Interim text data path: synthetic docs, smoke tokenizer, packing, loader batches and resume."""

import json
import re

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers
from omegaconf import OmegaConf

from data.config import DataConfig
from data.packing import IGNORE_INDEX, Packer, collate
from data.synthetic_text import SyntheticText, synthetic_document
from data.text_loader import TextLoader, build_loader
from data.tokenizer import (
    SMOKE_TOKENIZER_PATH,
    SPECIAL_TOKENS,
    load_tokenizer,
    smoke_training_texts,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def cfg(**kw):
    base = dict(seq_len=64, batch_size=4, seed=7)
    base.update(kw)
    return DataConfig(**base)


def doc_stream(tok, seed, indices):
    """Reference: the flat token stream the packer must lay out, eos after each document."""
    out = []
    for i in indices:
        out += tok.encode(synthetic_document(seed, i)) + [tok.eos_id]
    return out


def unpacked_tokens(batches):
    """Concatenate all rows' tokens, in order."""
    return [t for b in batches for t in b["input_ids"].view(-1).tolist()]


# ---- synthetic text ---------------------------------------------------------------------------


def test_synthetic_documents_depend_only_on_seed_and_index():
    src = SyntheticText(3)
    later = [src[i] for i in (9, 2, 5)]
    assert later == [synthetic_document(3, i) for i in (9, 2, 5)]
    assert synthetic_document(3, 5) != synthetic_document(4, 5)
    assert synthetic_document(3, 5) != synthetic_document(3, 6)
    # the same world facts hold across all documents of one seed: learnable by memorisation
    homes = {}
    for i in range(300):
        for name, city in re.findall(r"(\w+) lives in (\w+)\.", src[i]):
            assert homes.setdefault(name, city) == city, (name, city, i)
    assert len(homes) > 10


# ---- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_tokens(tok):
    assert tok.vocab_size == 1024
    assert SMOKE_TOKENIZER_PATH.stat().st_size < 200_000
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and max(ids) < tok.vocab_size
    assert tok.eos_id == tok.token_id("<|endoftext|>") and tok.pad_id == tok.token_id("<|pad|>")
    for text in [synthetic_document(1, 0), "Héllo wörld ✓ 😀\n\ttabs  and  spaces", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|image_pad|>") == [tok.token_id("<|image_pad|>")]
    # the synthetic text compresses to about one token per word
    text = synthetic_document(1, 1)
    assert len(tok.encode(text)) < 0.4 * len(text)
    with pytest.raises(KeyError, match="<|im_start|>"):
        tok.token_id("<|im_start|>")


def test_shipped_tokenizer_regenerates_identically(tmp_path):
    out = tmp_path / "t.json"
    train_tokenizer(smoke_training_texts(), 1024, str(out))
    assert out.read_bytes() == SMOKE_TOKENIZER_PATH.read_bytes()


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"])
def test_qwen_style_tokenizer_file_loads(tmp_path, eos):
    # a stand-in for a Qwen tokenizer.json: byte-level BPE, other special tokens, no <|pad|>
    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", eos])
    raw.train_from_iterator(["hello world"] * 10, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    q = load_tokenizer(str(path))
    assert q.eos_id == q.token_id(eos) and q.pad_id == q.eos_id
    assert q.decode(q.encode("hello world")) == "hello world"


def test_missing_tokenizer_file_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.tokenizer="):
        load_tokenizer(str(tmp_path / "nope.json"))


# ---- packing ----------------------------------------------------------------------------------


def test_long_document_splits_across_rows():
    docs = iter([list(range(10, 30)), [40, 41]])  # 20 tokens (+eos) then 2 (+eos), seq_len 8
    p = Packer(seq_len=8, eos_id=0, pad_id=1)
    rows = []
    while (r := p.next_row(lambda: next(docs, None))) is not None:
        rows.append(r)
    assert [r.tokens for r in rows] == [
        list(range(10, 18)),
        list(range(18, 26)),
        [26, 27, 28, 29, 0, 40, 41, 0],
    ]
    assert [r.seg_lens for r in rows] == [[8], [8], [5, 3]]
    b = collate(rows)
    assert b["position_ids"][2].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert b["labels"][2].tolist() == [27, 28, 29, 0, -100, 41, 0, -100]
    assert b["labels"][0, -1] == -100  # the split-off target lives in the next row: no label
    assert b["cu_seqlens"].tolist() == [0, 8, 16, 21, 24]
    # a stream that ends mid-row pads it; the padding is its own segment without labels
    p2 = Packer(seq_len=8, eos_id=0, pad_id=1)
    docs2 = iter([[5, 6]])
    r = p2.next_row(lambda: next(docs2, None))
    assert r.tokens == [5, 6, 0, 1, 1, 1, 1, 1] and r.seg_lens == [3, 5] and r.num_pad == 5
    assert collate([r])["labels"][0].tolist() == [6, 0] + [-100] * 6
    assert p2.next_row(lambda: None) is None


# ---- loader -----------------------------------------------------------------------------------


def check_batch(b, B, T, pad_id):
    for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
        assert b[k].dtype == torch.int64 and b[k].device.type == "cpu", k
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (B, T)
    ids, lab, pos = (b[k].view(-1) for k in ("input_ids", "labels", "position_ids"))
    # cu_seqlens: segment starts are exactly where positions restart; rows start segments
    starts = torch.nonzero(pos == 0).view(-1)
    assert b["cu_seqlens"].tolist() == starts.tolist() + [B * T]
    assert set(range(0, B * T, T)) <= set(starts.tolist())
    seg_len = b["cu_seqlens"].diff()
    assert torch.equal(pos, torch.cat([torch.arange(n) for n in seg_len.tolist()]))
    # labels: next token inside the same segment; -100 at each segment's last token and on padding
    for t in range(B * T):
        same_seg = t + 1 < B * T and pos[t + 1] == pos[t] + 1
        want = ids[t + 1] if same_seg and ids[t] != pad_id else IGNORE_INDEX
        assert lab[t] == want, t
    assert b["num_tokens"] == int((lab != IGNORE_INDEX).sum())


def test_batches_shapes_labels_positions(tok):
    loader = TextLoader(cfg(), tok)
    batches = [next(loader) for _ in range(3)]
    for b in batches:
        check_batch(b, 4, 64, tok.pad_id)
        assert b["num_tokens"] > 0.9 * 4 * 64  # no padding in an infinite stream
    # the rows, read in order, are exactly the documents with eos after each (splits included)
    flat = unpacked_tokens(batches)
    assert flat == doc_stream(tok, 7, range(loader.cursor))[: len(flat)]


def test_seed_determinism(tok):
    a, b, c = (TextLoader(cfg(seed=s), tok) for s in (7, 7, 8))
    ba, bb, bc = next(a), next(b), next(c)
    assert all(torch.equal(ba[k], bb[k]) for k in ("input_ids", "labels", "cu_seqlens"))
    assert not torch.equal(ba["input_ids"], bc["input_ids"])


def test_dp_ranks_read_disjoint_documents(tok):
    W, N = 3, 40
    streams = []
    for r in range(W):
        loader = TextLoader(cfg(num_docs=N), tok, dp_rank=r, dp_world=W)
        batches = list(loader)
        for b in batches:
            check_batch(b, 4, 64, tok.pad_id)
        flat = unpacked_tokens(batches)
        # after the rank's documents only the finite stream's padding follows
        ref = doc_stream(tok, 7, range(r, N, W))
        assert flat[: len(ref)] == ref and set(flat[len(ref) :]) <= {tok.pad_id}
        streams.append(set(range(r, N, W)))
    assert set.union(*streams) == set(range(N)) and sum(map(len, streams)) == N


def test_finite_stream_pads_last_batch_then_stops(tok):
    loader = TextLoader(cfg(num_docs=3, batch_size=8), tok)
    batches = list(loader)
    assert len(batches) == 1
    b = batches[0]
    check_batch(b, 8, 64, tok.pad_id)
    ref = doc_stream(tok, 7, range(3))
    assert b["input_ids"].view(-1)[: len(ref)].tolist() == ref
    assert (b["labels"].view(-1)[len(ref) - 1 :] == IGNORE_INDEX).all()
    assert list(loader) == []


@pytest.mark.parametrize("n", [0, 1, 3])
def test_exact_resume(tok, n):
    c = cfg(seq_len=48, batch_size=2)
    a = TextLoader(c, tok, dp_rank=1, dp_world=2)
    for _ in range(n):
        next(a)
    sd = a.state_dict()
    # plain Python ints / lists of ints only (saved into a DCP checkpoint)
    for v in sd.values():
        assert type(v) is int or (type(v) is list and all(type(t) is int for t in v))
    sd = json.loads(json.dumps(sd))
    expected = [next(a) for _ in range(4)]
    b = TextLoader(c, tok, dp_rank=1, dp_world=2)
    b.load_state_dict(sd)
    for e, got in zip(expected, [next(b) for _ in range(4)]):
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(e[k], got[k]), k
        assert e["num_tokens"] == got["num_tokens"]


def test_resume_carries_split_document(tok):
    c = cfg(seq_len=32, batch_size=1)
    a = TextLoader(c, tok)
    next(a)
    sd = a.state_dict()
    assert sd["carry"], "seq_len 32 is shorter than every document: the row must split one"
    b = TextLoader(c, tok)
    b.load_state_dict(sd)
    assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


def test_resume_refuses_a_different_stream(tok):
    sd = TextLoader(cfg(), tok, dp_rank=0, dp_world=2).state_dict()
    with pytest.raises(ValueError, match="dp_world=2"):
        TextLoader(cfg(), tok).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed=7"):
        TextLoader(cfg(seed=8), tok, dp_rank=0, dp_world=2).load_state_dict(sd)


# ---- config -----------------------------------------------------------------------------------


def test_config_structured_and_validated():
    c = OmegaConf.structured(DataConfig)
    c.seq_len = 128
    loader = build_loader(OmegaConf.to_object(c))
    assert next(loader)["input_ids"].shape == (8, 128)
    with pytest.raises(ValueError, match=r"data.seq_len=0 must be >= 2"):
        DataConfig(seq_len=0).validate()
    with pytest.raises(ValueError, match=r"data.batch_size=0 must be >= 1"):
        DataConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match=r"data.name='parquet' must be one of"):
        DataConfig(name="parquet").validate()
    with pytest.raises(ValueError, match=r"data=webdataset needs exactly one of them"):
        DataConfig(name="webdataset").validate()
    with pytest.raises(ValueError, match=r"data.num_docs=0"):
        DataConfig(num_docs=0).validate()
    with pytest.raises(ValueError, match=r"dp_rank=2 must be in \[0, dp_world=2\)"):
        build_loader(DataConfig(), dp_rank=2, dp_world=2)
