"""Vision tower throughput (images/s): the project's packed encoder (all images in one sequence,
attention per image via cu_seqlens, equal-length images batched) against the same weights run
padded-to-largest (every image padded to the longest one's patch count, a key-padding mask in
batched SDPA, the MLPs computing the padding too), same process, same inputs.

    python benchmarks/bench_vision.py                          # released ViT width, 2 blocks
    python benchmarks/bench_vision.py --vit smoke --repeats 5  # configs/model/smoke_vl.yaml's ViT
    python benchmarks/bench_vision.py --depth 27 --images 2    # the whole released tower (slow on CPU)
    python benchmarks/bench_vision.py --threads 1              # what BENCHMARKS.md reports

Scenarios: N images of 448x448 (all equal: padding costs nothing, so the ratio shows the cost of the
packing bookkeeping), and N images of mixed sizes and aspect ratios (smart_resize'd to the patch
grid). Before timing, the two paths' outputs are checked with allclose. Forward only (no_grad) by
default, `--backward` times forward+backward. speed-up = padded time / packed time.
"""

from __future__ import annotations

import argparse
import dataclasses

import common  # noqa: F401  (puts the checkout on sys.path)
import torch
import torch.nn.functional as F

from common import OtherLoad, interleaved_medians, machine_line, markdown_table
from model.config import load_model_config
from model.vision import VisionEncoder, grid_list, rotate_half
from model.vision_config import VisionConfig
from model.vision_processing import smart_resize

MIXED = [(448, 448), (224, 224), (336, 640), (512, 384), (256, 256), (640, 480), (224, 448),
         (480, 352)]


def padded_forward(enc: VisionEncoder, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The baseline: the same math with every image (temporal slice) padded to the longest.
    [N, C*Tp*P*P] -> [N/4, out]."""
    grids = grid_list(grid_thw)
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    s, L = len(lengths), max(lengths)
    x = enc.patch_embed(pixel_values) + enc.position_embeddings(grids)
    cos, sin = enc.rotary(grids)
    valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]   # [S, L]

    def pad(t: torch.Tensor) -> torch.Tensor:  # [N, ...] -> [S, L, ...]
        out = t.new_zeros(s, L, *t.shape[1:])
        out[valid] = t
        return out

    x, cos, sin = pad(x), pad(cos)[:, :, None], pad(sin)[:, :, None]
    mask = valid[:, None, None, :]  # keys only; padded queries compute garbage that is dropped
    for blk in enc.blocks:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).view(s, L, 3, a.num_heads, a.head_dim).unbind(2)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask).transpose(1, 2).reshape(s, L, -1)
        x = x + a.proj(o)
        x = x + blk.mlp(blk.norm2(x))
    return enc.merger(x[valid])


def make_images(sizes, cfg: VisionConfig, seed: int = 0):
    factor = cfg.patch_size * cfg.spatial_merge_size
    grids = []
    for h, w in sizes:
        rh, rw = smart_resize(h, w, factor, min_pixels=factor * factor, max_pixels=1 << 30)
        grids.append([1, rh // cfg.patch_size, rw // cfg.patch_size])
    n = sum(t * h * w for t, h, w in grids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.patch_dim, generator=g), torch.tensor(grids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vit", choices=("released", "smoke"), default="released")
    ap.add_argument("--depth", type=int, default=2, help="blocks (the released tower has 27)")
    ap.add_argument("--images", type=int, default=8, help="images per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="time forward+backward")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default: torch's); on a shared 2-core VM, 1 avoids "
                         "OpenMP hand-offs that made each elementwise op 50x slower")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    name = "qwen35_35b_a3b" if args.vit == "released" else "smoke_vl"
    model_cfg = load_model_config(name)
    cfg = dataclasses.replace(model_cfg.vision, depth=args.depth)
    torch.manual_seed(0)
    enc = VisionEncoder(cfg, model_cfg.hidden_size)
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.02)

    load = OtherLoad()
    rows = []
    scenarios = {"448x448": [(448, 448)] * args.images,
                 "mixed sizes": [MIXED[i % len(MIXED)] for i in range(args.images)]}
    for label, sizes in scenarios.items():
        px, grid = make_images(sizes, cfg)
        with torch.no_grad():
            torch.testing.assert_close(padded_forward(enc, px, grid), enc(px, grid), rtol=1e-4, atol=1e-4)

        def run(fn):
            def call():
                if args.backward:
                    fn(enc, px, grid).float().square().mean().backward()
                else:
                    with torch.no_grad():
                        fn(enc, px, grid)
            return call

        t = interleaved_medians({"packed": run(VisionEncoder.forward), "padded": run(padded_forward)},
                                repeats=args.repeats)
        patches = int(grid.prod(-1).sum())
        padded_patches = len(sizes) * int(grid.prod(-1).max())
        rows.append([label, str(len(sizes)), f"{patches} / {padded_patches}",
                     f"{len(sizes) / t['packed']:.2f}", f"{len(sizes) / t['padded']:.2f}",
                     f"{t['padded'] / t['packed']:.2f}x"])

    mode = "forward+backward" if args.backward else "forward"
    print(f"vision tower ({args.vit} width: {cfg.hidden_size} hidden, {cfg.num_heads} heads, MLP "
          f"{cfg.intermediate_size}, depth {cfg.depth}), fp32 {mode}")
    print(machine_line())
    print(markdown_table(["images", "n", "patches (packed / padded)", "packed img/s", "padded img/s",
                          "speed-up"], rows))
    print(load.note())


if __name__ == "__main__":
    main()
