"""Decode time and peak memory per video: every frame decoded (what the loader did before) against
the frames and size the budget keeps (data/decode.py), with PyAV and decord.

    python benchmarks/bench_video.py [--seconds 40] [--size 640x480] [--fps 30] [--repeats 3]

Writes one H.264 mp4 (libx264, a keyframe every 250 frames, a moving gradient) to a temp dir, then
decodes it in a fresh process per method and repeat, so that each peak resident memory
(ru_maxrss) is that method's alone. The budget is the loader's (DocumentBuilder.plan_video) under
experiment=smoke_cpu: 2 frames per second, at most 64 frames, and the pixels over the kept frames
capped at what a packed row's visual-token cap takes (256 x 32 x 32 at seq_len 256).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import machine_line, markdown_table  # noqa: I001

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from data.decode import av_frames, decord_frames
from data.documents import DocumentBuilder
from data.pixels import video_patches_at
from data.tokenizer import load_tokenizer
from train.main import load_config

method, path = sys.argv[2], sys.argv[3]
data = open(path, "rb").read()
c = load_config(["experiment=smoke_cpu"]).data
plan = DocumentBuilder(c, load_tokenizer(c.tokenizer)).plan_video  # the loader's own budget
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
decoder = av_frames if method.startswith("av") else decord_frames
if method.endswith("all"):  # every frame at full size, then the budget's frames, resized
    frames, fps, _, _ = decoder(data)
    indices, size = plan(len(frames), fps, *frames[0].shape[:2])
    frames = [frames[i] for i in indices]
else:
    frames, fps, indices, size = decoder(data, None, plan)
import numpy as np, torch
x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
vis = video_patches_at(x, indices, size, fps, c.patch_size, c.temporal_patch_size, c.merge_size)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"s": dt, "peak_mib": peak / 1024, "base_mib": base / 1024,
                  "frames": len(indices), "size": list(size), "grid": list(vis.grid_thw)}))
"""


def write_clip(path: str, seconds: float, width: int, height: int, fps: int) -> None:
    import av

    n = int(seconds * fps)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "g": "250"}
        for f in range(n):
            img = np.stack([(xx + 3 * f) % 256, (yy + 2 * f) % 256, (xx + yy + f) % 256], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    methods = {"PyAV, every frame (before)": "av_all", "PyAV, kept frames at budget size": "av",
               "decord, every frame (before)": "decord_all",
               "decord, kept frames at budget size": "decord"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.mp4")
        t0 = time.perf_counter()
        write_clip(path, args.seconds, width, height, args.fps)
        mib = os.path.getsize(path) / 2**20
        print(f"clip: {args.seconds:g} s, {width}x{height}, {args.fps} fps, H.264, {mib:.1f} MiB "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        rows = []
        for name, method in methods.items():
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, "-c", CHILD, ROOT, method, path],
                                     capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if out.returncode:
                    print(f"{name}: failed: {out.stderr[-400:]}")
                    break
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not runs:
                continue
            r = runs[0]
            rows.append([name, f"{statistics.median(x['s'] for x in runs):.2f}",
                         f"{statistics.median(x['peak_mib'] for x in runs):.0f}",
                         f"{statistics.median(x['peak_mib'] - x['base_mib'] for x in runs):.0f}",
                         f"{r['frames']} x {r['size'][0]}x{r['size'][1]}", "x".join(map(str, r["grid"]))])
    print(markdown_table(["decode", "seconds per video", "peak RSS MiB", "over start-up MiB",
                          "frames kept", "grid t x h x w"], rows))
    print(f"median of {args.repeats} fresh processes each; " + machine_line())


if __name__ == "__main__":
    main()
