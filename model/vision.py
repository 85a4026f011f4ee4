"""The vision tower: patch embedding, interpolated learned positions, 2D rotary, pre-LN ViT blocks
with attention per image / temporal slice, and the 2x2 patch merger into the decoder's width.

Input layout (model/vision_processing.py makes it): all images and videos of a batch are one
flat sequence of patches, `pixel_values [N, C*Tp*P*P]`, with `grid_thw [M, 3]` giving each item's
(temporal patches, patch rows, patch columns). Within an item, patches are ordered frame by frame
and, inside a frame, merge block by merge block (block row, block column, then the 2x2 patches of
the block in raster order): the released processors' order, which lets the merger take 4
consecutive rows as one merged token. Module and parameter names are the released ones
(`patch_embed.proj`, `pos_embed`, `blocks.i.attn.qkv`, `merger.linear_fc1`, ...), so a Hugging Face
`model.visual.*` state dict loads as is.

`pixel_values` are either normalised floats (the processors' output) or the raw uint8 patches the
data loader sends: those are normalised here, on the model's device, where it costs one fused
elementwise pass instead of loader time, and the host-to-device copy is a quarter of the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import attention_backend
from model.vision_config import VisionConfig
from model.vision_processing import normalize_patches


def grid_list(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    """[M, 3] tensor -> list of (t, h, w) ints (one host sync, then plain Python bookkeeping)."""
    return [tuple(int(v) for v in row) for row in grid_thw.tolist()]


def vision_cu_seqlens(grids: list[tuple[int, int, int]], device=None) -> torch.Tensor:
    """Attention segments: one per temporal slice of every item (h*w patches each). -> [S+1] int64."""
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    return F.pad(torch.tensor(lengths, dtype=torch.long, device=device).cumsum(0), (1, 0))


def block_order_rows_cols(h: int, w: int, merge: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of one h x w frame in merge-block order. -> two [h*w] long."""
    rows = torch.arange(h, device=device).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w, device=device).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    # [bh, mh, bw, mw] -> [bh, bw, mh, mw]: blocks in raster order, patches in raster order inside.
    return rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: list[int], backend: str = "auto") -> torch.Tensor:
    """Full (non-causal) attention inside each segment of a packed sequence, through the model's
    attention seam (model/attention_backend.py: equal-length segments batch into one SDPA call, no
    N x N block-diagonal mask). q, k, v: [N, H, D]; cu_seqlens: N+1 boundaries as Python ints."""
    return attention_backend.packed_attention(q, k, v, cu_seqlens, causal=False, backend=backend)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class VisionRotary(nn.Module):
    """2D rotary: (row, col) positions -> (cos, sin) [N, head_dim] in fp32.

    head_dim/4 frequencies theta^(-4i/head_dim); the first half of the rotated channels reads the
    row, the second half the column ([row freqs | col freqs], then duplicated for rotate-half).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        half = self.head_dim // 2
        return 1.0 / (self.theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))

    def reset_parameters(self) -> None:
        self.inv_freq = self._inv_freq().to(self.inv_freq.device, self.inv_freq.dtype)

    def forward(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.cat([rows[:, None].float() * self.inv_freq, cols[:, None].float() * self.inv_freq], -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    """x [N, D] -> [N, D]: multi-head attention with qkv bias, 2D rotary, within segments."""

    def __init__(self, cfg: VisionConfig, attn_backend: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        # Rotary in fp32 (as released): bf16 angles lose the position of far patches.
        cos, sin = cos[:, None], sin[:, None]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = packed_attention(q, k, v, cu_seqlens, self.attn_backend)
        return self.proj(out.reshape(n, self.num_heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    """Pre-LayerNorm ViT block. x [N, D] -> [N, D]."""

    def __init__(self, cfg: VisionConfig, attn_backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg, attn_backend)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """[N, C*Tp*P*P] -> [N, D]: a Conv3d whose kernel equals its stride, i.e. one linear map per patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        k = self.shape[1:]
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).flatten(1)


class PatchMerger(nn.Module):
    """[N, D] -> [N/4, out]: LayerNorm, concatenate each 2x2 block (4 consecutive rows), 2-layer MLP."""

    def __init__(self, cfg: VisionConfig, out_hidden_size: int):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.merge_unit
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionEncoder(nn.Module):
    """pixel_values [N, C*Tp*P*P] (float, normalised; or uint8, raw), grid_thw [M, 3] -> merged
    visual tokens [N/4, out_hidden_size], items concatenated in grid_thw order (item i contributes
    t*h*w/4 rows)."""

    def __init__(self, cfg: VisionConfig, out_hidden_size: int, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.rotary_pos_emb = VisionRotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg, attn_backend) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, out_hidden_size)

    def position_embeddings(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """The side x side learned table resampled to each grid: bilinear with aligned corners
        (table corners on grid corners), as the released `fast_pos_embed_interpolate`. -> [N, D]"""
        side, merge = self.cfg.num_grid_per_side, self.cfg.spatial_merge_size
        table = self.pos_embed.weight
        if not grids:
            return table[:0]  # empty, and still a function of the table (zero gradient)
        device = table.device
        out = []
        for t, h, w in grids:
            rows, cols = block_order_rows_cols(h, w, merge, device)
            taps, weights = [], []
            # Separable bilinear taps per axis: floor and floor+1 (clamped), weights 1 - distance.
            for idx, size in ((rows, h), (cols, w)):
                src = torch.linspace(0, side - 1, size, device=device)[idx]
                lo = src.floor().long()
                hi = (lo + 1).clamp(max=side - 1)
                frac = src - lo
                taps.append((lo, hi))
                weights.append((1 - frac, frac))
            emb = 0
            for r, wr in zip(taps[0], weights[0]):
                for c, wc in zip(taps[1], weights[1]):
                    emb = emb + table[r * side + c] * (wr * wc)[:, None]
            out.append(emb.repeat(t, 1))
        return torch.cat(out)

    def rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.rotary_pos_emb.inv_freq.device
        if not grids:
            none = torch.zeros(0, dtype=torch.long, device=device)
            return self.rotary_pos_emb(none, none)
        rc = [block_order_rows_cols(h, w, self.cfg.spatial_merge_size, device) for _, h, w in grids]
        rows = torch.cat([r.repeat(t) for (r, _), (t, _, _) in zip(rc, grids)])
        cols = torch.cat([c.repeat(t) for (_, c), (t, _, _) in zip(rc, grids)])
        return self.rotary_pos_emb(rows, cols)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        # No item (a batch without images): the tower still runs, on zero patches, so that a rank
        # without images runs the same modules and collectives as its data-parallel peers (FSDP's
        # gathers, FP8 amax reductions) and gets zero gradients for every parameter.
        grids = grid_list(grid_thw)
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw "
                             f"{grids} describes {expected}")
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_patches(pixel_values)
        x = self.patch_embed(pixel_values)
        x = x + self.position_embeddings(grids).to(x.dtype)
        cos, sin = self.rotary(grids)
        cu = vision_cu_seqlens(grids).tolist()
        for block in self.blocks:
            x = block(x, cos, sin, cu)
        return self.merger(x)
