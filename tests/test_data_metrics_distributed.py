"""Data counters over every rank: two data-parallel gloo ranks read different shards, and the
logged `skipped/*` and `data_share/*` are those of both, not rank 0's alone."""

import json
from collections import Counter

from data.format import encode_sample
from tests.distributed import run_ranks
from tests.webdataset_helpers import text_shard


def _train(rank, world, tmp):
    import train.trainer
    from train.main import load_config
    from train.trainer import Trainer

    train.trainer.shutdown = lambda: None  # tests/distributed.py ends the process group

    spec = lambda src: f"{tmp}/{src}-{{0..1}}.tar"  # noqa: E731 - shard 0 for rank 0, 1 for rank 1
    sources = (f"+data.sources={{a: {{shards: '{spec('a')}', weight: 1}}, "
               f"b: {{shards: '{spec('b')}', weight: 1}}}}")
    cfg = load_config(["model=tiny", "data=webdataset", sources, "data.seq_len=64",
                       "data.batch_size=2", "data.shuffle_shards=false", "data.shuffle_buffer=1",
                       "data.virtual_streams=2",  # stream r (rank r's only one) reads shard r
                       "train.device=cpu", "train.autocast=none", "train.peak_flops=1e12",
                       "logging.wandb=disabled", "train.max_steps=2", "checkpoint.interval=0",
                       "checkpoint.save_final=false", f"run_dir={tmp}/run"])
    t = Trainer(cfg, tmp / "run")
    seen = Counter()
    next_batch = t.loader.__class__.__next__

    def recording(loader):
        b = next_batch(loader)
        if t.step == 1:  # the batches of step 2, the last (logged) step
            seen.update(b["source_tokens"])
        return b

    t.loader.__class__.__next__ = recording
    t.fit()
    (tmp / f"seen{rank}.json").write_text(json.dumps(dict(seen)))


def test_skip_counters_and_source_shares_cover_every_rank(tmp_path):
    for src, size in (("a", 3), ("b", 9)):
        for r in range(2):
            docs = [(f"{src}{r}d{i}", encode_sample(f"{src}{r}d{i}",
                                                     [{"text": f"{src} text {i} " * (size + 4 * r)}]))
                    for i in range(40)]
            if src == "a" and r == 1:  # rank 1 alone meets bad samples
                docs.insert(1, ("bad0", {"json": b"{oops"}))
                docs.insert(3, ("bad1", {"bin": b"no json"}))  # a lone .txt would be a text doc
            text_shard(tmp_path / f"{src}-{r}.tar", docs)
    run_ranks(2, _train, tmp_path, timeout_s=300)
    last = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["skipped/invalid_json"] == 1 and last["skipped/missing_json"] == 1
    seen = Counter()
    for r in range(2):
        seen.update(json.loads((tmp_path / f"seen{r}.json").read_text()))
    total = sum(seen.values())
    for src in ("a", "b"):
        assert abs(last[f"data_share/{src}"] - seen[src] / total) < 1e-12
    rank0 = Counter(json.loads((tmp_path / "seen0.json").read_text()))
    assert abs(rank0["a"] / sum(rank0.values()) - seen["a"] / total) > 1e-3  # the ranks differ
