import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and reductions are stable across runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def tiny_cfg():
    from model.config import load_model_config

    return load_model_config("tiny")


@pytest.fixture(scope="session")
def mm_shards(tmp_path_factory) -> str:
    """Spec of small learnable multimodal shards (data/synthetic.py: shapes, clips, interleaved and
    text documents): 4 shards of 24 documents."""
    from data.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("mm_shards")
    write_synthetic(str(d), seed=5, num_shards=4, docs_per_shard=24)
    return f"{d}/shard-{{000000..000003}}.tar"


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory) -> str:
    """Spec of 15 small shards of 60 text documents, every one unique ("document <i> ..."), of 7
    to 46 words: some span several rows of 64 tokens."""
    from data.format import ShardSink, encode_sample

    sink = ShardSink(str(tmp_path_factory.mktemp("text_shards")), max_bytes=4096)
    for i in range(60):
        key = f"t{i:04d}"
        sink.write(key, encode_sample(key, [{"text": f"document {i} " + "word " * (5 + i * 7 % 40)}]))
    sink.close()
    return sink.spec()


@pytest.fixture(scope="session")
def tok():
    """The shipped smoke tokenizer."""
    from data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def syn(tmp_path_factory):
    """Directory of 3 synthetic multimodal shards of 24 documents (seed 3): shard-00000{0..2}.tar."""
    from data.synthetic import write_synthetic

    d = tmp_path_factory.mktemp("syn")
    write_synthetic(str(d), seed=3, num_shards=3, docs_per_shard=24)
    return d
