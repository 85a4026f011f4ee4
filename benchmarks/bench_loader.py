"""The streaming loader against bare webdataset + pillow decoding of the same shards.

    python benchmarks/bench_loader.py [--docs 1024] [--rounds 3] [--data smoke|photos]

Writes shards to a temp dir: `smoke`, the smoke run's synthetic shards (data/synthetic.py: 96x96
PNG shapes, 8x64x64 GIF clips, text); `photos`, image-caption documents with 320x240 JPEG photos
(smooth random scenes plus sensor noise, ~quality 90) and 10-40 word captions, the size class of
web image-text data after the usual resizing. Then times, round-robin in one process:
- baseline: `webdataset.WebDataset(urls)` iterating the raw samples and decoding every image (and
  every GIF frame) to an RGB array with pillow: the decode cost any loader pays;
- the project's loader (experiment smoke_cpu's data config: B=8, T=256) with 0, 1 and 2
  DataLoader workers: decode + resize/patchify + tokenize + pack + M-RoPE + collate.
Reports documents/s and tokens/s, the cost per document relative to the bare decode (wall time;
and, for the two in-process pipelines, CPU time, which other processes on a shared machine disturb
far less), and the headroom over what the smoke trainer consumes (tokens per step / seconds per
step, measured).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import numpy as np
from common import OtherLoad, machine_line, markdown_table  # noqa: I001

import webdataset as wds
from PIL import Image, ImageSequence

from data.config import DataConfig
from data.synthetic import write_synthetic
from data.loader import Loader


def bare_decode(urls: list[str], n: int) -> tuple[float, int, None, float]:
    """(seconds, samples, None, CPU seconds) to read and pillow-decode the first n samples."""
    t0, c0 = time.perf_counter(), time.process_time()
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        for key, value in sample.items():
            if key.endswith((".png", ".jpg")):
                np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
            elif key.endswith(".gif"):
                for frame in ImageSequence.Iterator(Image.open(io.BytesIO(value))):
                    np.asarray(frame.convert("RGB"))
        seen += 1
        if seen == n:
            break
    return time.perf_counter() - t0, seen, None, time.process_time() - c0


def write_photos(out_dir: str, num_shards: int, docs_per_shard: int, seed: int = 11) -> list[str]:
    """Image-caption documents with 320x240 JPEG photos; -> the shard paths."""
    from data.format import ShardSink, encode_sample
    from data.synthetic_text import synthetic_document

    rng = np.random.default_rng(seed)
    sink = ShardSink(out_dir, max_bytes=docs_per_shard * 24_000)
    for i in range(num_shards * docs_per_shard):
        # A smooth scene (bilinear upsampling of a coarse random grid) plus noise: JPEG sizes of
        # real photos (~20 kB here), not those of flat synthetic shapes.
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        pixels = (np.asarray(coarse.resize((320, 240), Image.BILINEAR), dtype=np.int16)
                  + rng.integers(-12, 13, (240, 320, 3)))
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        # A caption of 10-40 words of the smoke text (data/synthetic_text.py), which the smoke
        # tokenizer was trained on, as real captions are on a real tokenizer's training data.
        caption = " ".join(synthetic_document(seed, i).split()[:int(rng.integers(10, 40))])
        sink.write(f"{i:08d}", encode_sample(f"{i:08d}", [{"image": buf.getvalue(), "ext": "jpg"},
                                                          {"text": caption}]))
    sink.close()
    return sink.paths


def loader_run(cfg: DataConfig, n: int) -> tuple[float, int, int, float]:
    """(seconds, documents, tokens, CPU seconds of this process) to take batches until n documents
    were packed; worker start-up is excluded (timed from the first batch)."""
    loader = Loader(cfg)
    first = next(loader)
    docs = tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while docs < n:
        b = next(loader)
        docs += int((b["input_ids"] == 0).sum())  # one end-of-document token per document
        tokens += int((b["input_ids"] != 1).sum())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    loader.close()
    del first
    return dt, docs, tokens, cpu


def trainer_rate() -> tuple[float, float]:
    """(tokens per step, seconds per step) of the smoke_cpu trainer, 3 steps after 1 warmup."""
    from pathlib import Path

    from train.main import load_config
    from train.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(["experiment=smoke_cpu", "logging.wandb=disabled", "data.num_workers=0",
                           f"run_dir={d}", "train.resume=never", "train.peak_flops=1e12",
                           f"data.shards='{d}/shard-{{000000..000001}}.tar'"])
        t = Trainer(cfg, Path(d))
        t.train_step()
        times, waits = [], []
        for _ in range(3):
            s = time.perf_counter()
            r = t.train_step()
            times.append(time.perf_counter() - s)
            waits.append(r["data_wait_s"])
        return cfg.data.batch_size * cfg.data.seq_len, statistics.median(times), statistics.median(waits)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", choices=("smoke", "photos"), default="smoke")
    args = ap.parse_args()
    load = OtherLoad()
    with tempfile.TemporaryDirectory() as d:
        if args.data == "smoke":
            urls = write_synthetic(d, seed=11, num_shards=8, docs_per_shard=256)
        else:
            urls = write_photos(d, num_shards=4, docs_per_shard=256)
        base = dict(name="webdataset", shards=urls[0] if len(urls) == 1 else
                    f"{d}/shard-{{000000..{len(urls) - 1:06d}}}.tar", seq_len=256,
                    batch_size=8, image_min_pixels=1024, video_min_pixels=1024)
        runs = {"bare webdataset + pillow decode": lambda: bare_decode(urls, args.docs)}
        for w in (0, 1, 2):
            runs[f"loader, {w} workers"] = (lambda w=w: loader_run(DataConfig(**base, num_workers=w), args.docs))
        results: dict[str, list] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                results[k].append(fn())
    rows = []
    bare = results["bare webdataset + pillow decode"]
    bare_per_doc = statistics.median(r[0] / r[1] for r in bare)
    bare_cpu_per_doc = statistics.median(r[3] / r[1] for r in bare)
    tok_per_step, step_s, wait_s = trainer_rate()
    need = tok_per_step / step_s
    for k, rs in results.items():
        per_doc = statistics.median(r[0] / r[1] for r in rs)
        # CPU time only says what a pipeline costs when all of its work runs in this process.
        cpu = (f"{statistics.median(r[3] / r[1] for r in rs) / bare_cpu_per_doc:.2f}x"
               if k == "loader, 0 workers" else "-")
        if rs[0][2] is not None:
            tok_s = statistics.median(r[2] / r[0] for r in rs)
            rows.append([k, f"{1 / per_doc:.0f}", f"{tok_s / 1e3:.1f}k", f"{per_doc / bare_per_doc:.2f}x",
                         cpu, f"{tok_s / need:.0f}x"])
        else:
            rows.append([k, f"{1 / per_doc:.0f}", "-", "1.00x", "1.00x", "-"])
    what = ("smoke shards (images 96x96 png, clips 8x64x64 gif, text)" if args.data == "smoke" else
            "image-caption documents (320x240 jpeg photos)")
    print(f"loader vs bare decode, {args.docs} documents per run, {what}, B=8 T=256, "
          f"median of {args.rounds} rounds")
    print(markdown_table(["pipeline", "docs/s", "tokens/s", "wall time per doc vs bare",
                          "CPU time per doc vs bare", "vs smoke trainer need"], rows))
    print(f"bare decode: {bare_per_doc * 1e6:.0f} us wall, {bare_cpu_per_doc * 1e6:.0f} us CPU per document")
    print(f"smoke_cpu trainer: {tok_per_step} tokens per step, {step_s:.2f} s per step "
          f"({need / 1e3:.2f}k tokens/s), waiting for data {wait_s * 1e3:.1f} ms per step "
          f"(in-process loader)")
    print(machine_line())
    print(load.note())


if __name__ == "__main__":
    main()
