"""`python -m model.summary NAME [--json] [--seq-len T]`: architecture table and parameter counts
of a model config, computed on the meta device (nothing is allocated)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from model.config import ConfigError, load_model_config
from model.params import build_meta, count_params, train_flops_per_token


def summarize(name: str, seq_len: int = 4096) -> dict:
    cfg = load_model_config(name)
    model = build_meta(cfg)
    counts = count_params(model)
    types = Counter(cfg.resolved_layer_types())
    return {
        "name": cfg.name,
        "layers": cfg.num_layers,
        "linear_attention_layers": types.get("linear_attention", 0),
        "full_attention_layers": types.get("full_attention", 0),
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "mlp": (f"moe {cfg.num_experts}e top-{cfg.num_experts_per_tok} "
                f"(+shared {cfg.shared_expert_intermediate_size})" if cfg.mlp_type == "moe"
                else f"dense {cfg.intermediate_size}"),
        "mtp_layers": cfg.mtp_num_layers,
        "vision": (f"ViT {cfg.vision.depth}x{cfg.vision.hidden_size} ({cfg.vision.num_heads} heads, "
                   f"MLP {cfg.vision.intermediate_size}), merger -> {cfg.hidden_size}"
                   if cfg.vision is not None else "none"),
        "total_params": counts.total,
        "active_params": counts.active,
        "embedding_params": counts.embedding,
        "mtp_params": counts.mtp,
        "vision_params": counts.vision,
        "train_flops_per_token": train_flops_per_token(cfg, seq_len),
        "seq_len_for_flops": seq_len,
    }


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", help="a configs/model/ name (tiny, smoke, qwen35_397b_a17b, ...) or a YAML path")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seq-len", type=int, default=4096, help="sequence length for the FLOPs figure")
    args = ap.parse_args(argv)
    try:
        info = summarize(args.name, args.seq_len)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        shown = _human(v) if isinstance(v, (int, float)) and k.endswith(("params", "token")) else v
        print(f"{k:<{width}}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
