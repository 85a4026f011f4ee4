"""`python -m model.hf import|export ...`: convert between Hugging Face checkpoint directories and
the project's DCP checkpoints. `python -m model.hf import --help` lists the options. (The command
keeps its model/hf name; the I/O is here, in train/checkpoint.)"""

from __future__ import annotations

import argparse
import sys
import time

from model.config import ConfigError
from model.hf.config_map import FAMILIES
from train.checkpoint.hf_files import HF_DTYPE_NAMES


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    units = {"KB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30, "TB": 2 ** 40}
    t = text.strip().upper()
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[:-len(u)]) * f)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.hf", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF directory -> DCP checkpoint for train.init_from")
    imp.add_argument("--hf-dir", required=True, help="config.json + *.safetensors (+ index)")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--name", default=None, help="model.name in the config (default: HF dir name)")
    imp.add_argument("--dtype", choices=HF_DTYPE_NAMES, default="float32",
                     help="stored dtype (default float32: the trainer keeps fp32 master weights)")
    imp.add_argument("--skip-mtp", action="store_true", help="drop mtp.* weights (no MTP head)")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="DCP checkpoint -> HF directory transformers loads")
    exp.add_argument("--ckpt", required=True, help="an imported checkpoint or <run>/checkpoints/step_N")
    exp.add_argument("--out", required=True, help="directory to create")
    exp.add_argument("--family", choices=list(FAMILIES), default=None,
                     help="HF class (default: the imported one, else qwen3_5[_moe][_text] by config)")
    exp.add_argument("--model", default=None, help="model config NAME or YAML path when the "
                     "checkpoint has none (default: CKPT/configs/model/hf.yaml or the run's config)")
    exp.add_argument("--dtype", choices=HF_DTYPE_NAMES, default=None,
                     help="default: the dtype of the HF checkpoint the weights came from, else bfloat16")
    exp.add_argument("--max-shard-size", default="5GB")
    exp.add_argument("--fused-experts", action="store_true",
                     help="write experts.gate_up_proj/down_proj instead of per-expert tensors")
    exp.add_argument("--skip-mtp", action="store_true", help="leave out the MTP weights")
    exp.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from train.checkpoint.hf_convert import ConversionError, export_checkpoint, import_checkpoint

    start = time.perf_counter()
    try:
        if args.cmd == "import":
            out = import_checkpoint(args.hf_dir, args.out, name=args.name, dtype=HF_DTYPE_NAMES[args.dtype],
                                    skip_mtp=args.skip_mtp, overwrite=args.overwrite)
            print(f"imported {args.hf_dir} -> {out} in {time.perf_counter() - start:.1f}s\n"
                  f"train from it (or from the HF directory itself: train.init_from_hf=DIR model=from_hf):\n"
                  f"  python -m train.main model=hf "
                  f"'hydra.searchpath=[file://{out.resolve()}/configs]' train.init_from={out.resolve()}")
        else:
            out = export_checkpoint(args.ckpt, args.out, family=args.family, model=args.model,
                                    dtype=HF_DTYPE_NAMES.get(args.dtype),
                                    max_shard_bytes=parse_size(args.max_shard_size), fused_experts=args.fused_experts, skip_mtp=args.skip_mtp,
                                    overwrite=args.overwrite)
            print(f"exported {args.ckpt} -> {out} in {time.perf_counter() - start:.1f}s")
    except (ConfigError, ConversionError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
