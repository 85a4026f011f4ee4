"""Text through the one data path: synthetic docs, smoke tokenizer, packing, loader batches, resume."""

import json
import re

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers
from omegaconf import OmegaConf

from data.config import DataConfig
from data.documents import Document
from data.loader import build_loader
from data.packing import IGNORE_INDEX, Packer, collate
from data.synthetic_text import SyntheticText, synthetic_document
from data.tokenizer import (
    SMOKE_TOKENIZER_PATH,
    SPECIAL_TOKENS,
    load_tokenizer,
    smoke_training_texts,
    train_tokenizer,
)


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
    docs = iter([Document(list(range(10, 30)) + [0]), Document([40, 41, 0])])  # eos 0, seq_len 8
    p = Packer(seq_len=8, max_visual_tokens=8, pad_id=1)
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
    p2 = Packer(seq_len=8, max_visual_tokens=8, pad_id=1)
    docs2 = iter([Document([5, 6, 0])])
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


def stream_tokens(batches, streams: int) -> dict[int, list[int]]:
    """Each virtual stream's rows (global row g is stream g % streams), read in order."""
    out: dict[int, list[int]] = {}
    for b in batches:
        for g, row in zip(b["row_index"].tolist(), b["input_ids"].tolist()):
            out.setdefault(g % streams, []).extend(row)
    return out


def test_batches_shapes_labels_positions(tok):
    loader = build_loader(cfg(virtual_streams=2))
    batches = [next(loader) for _ in range(3)]
    for b in batches:
        check_batch(b, 4, 64, tok.pad_id)
        assert b["num_tokens"] > 0.9 * 4 * 64  # no padding in an infinite stream
    # stream v's rows, read in order, are exactly documents v, v + 2, ... with eos after each
    for v, flat in stream_tokens(batches, 2).items():
        assert flat == doc_stream(tok, 7, range(v, 200, 2))[: len(flat)]


def test_seed_determinism(tok):
    a, b, c = (build_loader(cfg(seed=s, virtual_streams=2)) for s in (7, 7, 8))
    ba, bb, bc = next(a), next(b), next(c)
    assert all(torch.equal(ba[k], bb[k]) for k in ("input_ids", "labels", "cu_seqlens"))
    assert not torch.equal(ba["input_ids"], bc["input_ids"])


def test_dp_ranks_read_disjoint_documents(tok):
    W, N, V = 3, 40, 6
    streams = {}
    for r in range(W):
        batches = list(build_loader(cfg(num_docs=N, virtual_streams=V), dp_rank=r, dp_world=W))
        for b in batches:
            check_batch(b, 4, 64, tok.pad_id)
        mine = stream_tokens(batches, V)
        assert set(mine) == {r, r + W}  # rank r reads streams r, r + W, ...
        streams.update(mine)
    for v, flat in streams.items():
        # after the stream's documents only the finite stream's padding follows
        ref = doc_stream(tok, 7, range(v, N, V))
        assert flat[: len(ref)] == ref and set(flat[len(ref):]) <= {tok.pad_id}


def test_finite_stream_pads_last_batch_then_stops(tok):
    loader = build_loader(cfg(num_docs=3, batch_size=8, virtual_streams=1))
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
    c = cfg(seq_len=48, batch_size=2, virtual_streams=4)
    a = build_loader(c, dp_rank=1, dp_world=2)
    for _ in range(n):
        next(a)
    sd = a.state_dict()
    assert json.loads(json.dumps(sd)) == sd  # plain values (saved into a DCP checkpoint)
    expected = [next(a) for _ in range(4)]
    b = build_loader(c, dp_rank=1, dp_world=2)
    b.load_state_dict(json.loads(json.dumps(sd)))
    for e, got in zip(expected, [next(b) for _ in range(4)]):
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens", "row_index"):
            assert torch.equal(e[k], got[k]), k
        assert e["num_tokens"] == got["num_tokens"]


def test_resume_carries_split_document(tok):
    c = cfg(seq_len=32, batch_size=1, virtual_streams=1)
    a = build_loader(c)
    next(a)
    sd = a.state_dict()
    assert sd["streams"]["0"]["carry"], "seq_len 32 is shorter than every document: a row splits one"
    b = build_loader(c)
    b.load_state_dict(sd)
    assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


def test_resume_refuses_a_different_stream(tok):
    sd = build_loader(cfg(virtual_streams=4), dp_rank=0, dp_world=2).state_dict()
    with pytest.raises(ValueError, match="seed=7"):
        build_loader(cfg(seed=8, virtual_streams=4)).load_state_dict(sd)
    with pytest.raises(ValueError, match="virtual_streams=4"):
        build_loader(cfg(virtual_streams=8)).load_state_dict(sd)
    with pytest.raises(ValueError, match="lacks streams"):  # rank 1's streams are not in it
        build_loader(cfg(virtual_streams=4)).load_state_dict(sd)


# ---- config -----------------------------------------------------------------------------------


def test_config_structured_and_validated():
    c = OmegaConf.structured(DataConfig)
    c.seq_len = 128
    c.virtual_streams = 4
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
    with pytest.raises(ValueError, match=r"data.virtual_streams=64 must be a multiple of the "
                                         r"data-parallel size 3"):
        build_loader(DataConfig(), dp_rank=0, dp_world=3)
    with pytest.raises(ValueError, match=r"data.num_workers=3 must divide data.virtual_streams / "
                                         r"data-parallel size = 64 / 2 = 32"):
        build_loader(DataConfig(num_workers=3), dp_rank=0, dp_world=2)
