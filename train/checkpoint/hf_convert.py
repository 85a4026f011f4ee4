"""Import a Hugging Face checkpoint into the project (DCP checkpoint or in-memory model) and export
a project checkpoint back to a Hugging Face directory. The name and layout mapping is model/hf's
(pure functions); the files are read and written here.

An imported checkpoint directory CKPT holds:
- the DCP files of the model state (what `train.init_from=CKPT` / `train/checkpoint.load_model_weights`
  read) and the COMMITTED commit record (checksums); the directory appears under its final name only when complete;
- `configs/model/hf.yaml`: the ModelConfig, a Hydra config group file, so that
  `python -m train.main model=hf hydra.searchpath=[file://CKPT/configs] train.init_from=CKPT` trains it;
- `hf_config.json` (the source config.json, reused by export for fields the project does not model)
  and `hf_extra/` (tokenizer and processor files of the source directory, when present).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from model.config import ConfigError, ModelConfig, load_model_config
from model.hf.config_map import (FAMILIES, Family, default_family, family_of, hf_to_model_config,
                                 model_to_hf_config)
from model.hf.weights import Rule, check_rules_cover, expected_hf_shapes, model_rules
from model.params import build_meta
from train.checkpoint.commit import checksum_files, fsync_dir, write_record
from train.checkpoint.hf_dcp import dcp_model_shapes, find_run_config, load_dcp_tensors, save_dcp_lazily
from train.checkpoint.hf_files import (INDEX, SIDE_FILES, SINGLE, HFReader, SafetensorsWriter,
                                       dtype_name)

MODEL_YAML = Path("configs") / "model" / "hf.yaml"
HF_CONFIG = "hf_config.json"
HF_EXTRA = "hf_extra"


class ConversionError(ValueError):
    """A weight that cannot be placed, one that is missing, or a shape that does not fit."""


# ---- planning --------------------------------------------------------------------------------------

def _our_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_meta(cfg).state_dict().items()}


def _mtp_depth(hf_keys: set[str], skip_mtp: bool) -> int:
    layers = {int(m.group(1)) for k in hf_keys if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
    if skip_mtp or not any(k.startswith("mtp.") for k in hf_keys):
        return 0
    if layers != {0}:
        raise ConversionError(
            f"the checkpoint has MTP layers {sorted(layers)} (mtp.layers.N): the project maps exactly "
            f"one MTP layer (mtp.fc, mtp.layers.0, vLLM's layout); pass --skip-mtp to drop them")
    return 1


def weights_mtp_depth(hf_dir: Union[str, Path]) -> int:
    """The MTP depth the directory's weights hold (0 or 1), from the index alone."""
    return _mtp_depth(set(HFReader(hf_dir).keys()), skip_mtp=False)


class ImportPlan:
    """The rules of an HF directory, checked against its tensors before anything is written."""

    def __init__(self, hf_dir: Union[str, Path], name: Optional[str] = None, skip_mtp: bool = False,
                 cfg: Optional[ModelConfig] = None):
        """cfg: the model to load into (checked against config.json by the caller); default: the
        one config.json describes."""
        self.reader = HFReader(hf_dir)
        self.family: Family = family_of(self.reader.config)
        hf_keys = set(self.reader.keys())
        name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(hf_dir).resolve().name)
        if cfg is not None:
            skip_mtp = skip_mtp or cfg.mtp_num_layers == 0
            self.cfg = cfg
        else:
            self.cfg = hf_to_model_config(self.reader.config, name, _mtp_depth(hf_keys, skip_mtp))
        self.our_shapes = _our_shapes(self.cfg)
        self.rules = model_rules(
            self.cfg, self.family, [k for k in self.our_shapes if k.startswith("visual.")],
            fused_experts=lambda prefix: f"{prefix}experts.gate_up_proj" in hf_keys)
        check_rules_cover(self.rules, self.our_shapes)
        self._check(hf_keys, skip_mtp)
        self.rule_of = {k: r for r in self.rules for k in r.ours}
        self._cache: tuple[Optional[Rule], dict[str, torch.Tensor]] = (None, {})

    def _check(self, hf_keys: set[str], skip_mtp: bool) -> None:
        expected = expected_hf_shapes(self.rules, self.our_shapes)
        missing = sorted(k for k in expected if k not in hf_keys)
        if missing:
            raise ConversionError(
                f"{len(missing)} weight(s) the {self.family.name} model needs are not in "
                f"{self.reader.dir}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        for k, shape in expected.items():
            got = self.reader.shape(k)
            if got != shape:
                raise ConversionError(f"weight {k!r} has shape {tuple(got)}, the config implies "
                                      f"{tuple(shape)}")
        ignorable = {"lm_head.weight"} if self.cfg.tie_word_embeddings else set()
        unused = sorted(k for k in hf_keys - set(expected) - ignorable
                        if not (skip_mtp and k.startswith("mtp.")))
        if unused:
            raise ConversionError(
                f"{len(unused)} weight(s) of {self.reader.dir} have no place in the project's model: "
                f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")

    def tensor(self, key: str) -> torch.Tensor:
        """The project tensor `key`, computed from its rule (the last rule's outputs are cached, as
        the writer asks for a fused rule's outputs one after another)."""
        rule = self.rule_of[key]
        if self._cache[0] is not rule:
            outs = rule.to_ours([self.reader.get(k) for k in rule.theirs])
            self._cache = (rule, dict(zip(rule.ours, outs)))
        return self._cache[1][key]


# ---- import ---------------------------------------------------------------------------------------

def import_checkpoint(hf_dir: Union[str, Path], out: Union[str, Path], name: Optional[str] = None,
                      dtype: torch.dtype = torch.float32, skip_mtp: bool = False,
                      overwrite: bool = False) -> Path:
    """Convert an HF directory into a committed DCP checkpoint directory `out` (see module doc)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    plan = ImportPlan(hf_dir, name, skip_mtp)
    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_dcp_lazily(tmp, {k: (s, dtype) for k, s in plan.our_shapes.items()}, plan.tensor)
    (tmp / MODEL_YAML).parent.mkdir(parents=True)
    (tmp / MODEL_YAML).write_text(model_config_yaml(plan.cfg, source=str(Path(hf_dir).resolve())))
    (tmp / HF_CONFIG).write_text(json.dumps(plan.reader.config, indent=2) + "\n")
    extras = [f for f in SIDE_FILES if (plan.reader.dir / f).exists()]
    if extras:
        (tmp / HF_EXTRA).mkdir()
        for f in extras:
            shutil.copy2(plan.reader.dir / f, tmp / HF_EXTRA / f)
    # The commit record of a trainer checkpoint: step 0 and every top-level file's checksum.
    write_record(tmp, 0, checksum_files(tmp, sorted(f.name for f in tmp.iterdir() if f.is_file())))
    fsync_dir(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def model_config_yaml(cfg: ModelConfig, source: str = "") -> str:
    from omegaconf import OmegaConf

    head = f"# Imported from {source} by `python -m model.hf import`.\n" if source else ""
    return head + OmegaConf.to_yaml(OmegaConf.structured(cfg))


def load_pretrained(hf_dir: Union[str, Path], dtype: torch.dtype = torch.float32,
                    skip_mtp: bool = False):
    """The project's Qwen35LM with the weights of an HF checkpoint directory (no DCP involved)."""
    from model.language_model import Qwen35LM
    from model.moe import TopKRouter
    from model.rope import RotaryEmbedding
    from model.vision import VisionRotary

    plan = ImportPlan(hf_dir, skip_mtp=skip_mtp)
    with torch.device("meta"):
        model = Qwen35LM(plan.cfg)
    model.to_empty(device="cpu")
    model.to(dtype)
    if plan.cfg.tie_word_embeddings:  # to_empty gives each module its own tensor
        model.lm_head.weight = model.embed_tokens.weight
    state = model.state_dict()
    with torch.no_grad():
        for key in plan.our_shapes:
            state[key].copy_(plan.tensor(key))
        for m in model.modules():  # non-persistent buffers that to_empty left uninitialised
            if isinstance(m, (RotaryEmbedding, VisionRotary)):
                m.reset_parameters()
            elif isinstance(m, TopKRouter):
                m.tokens_per_expert.zero_()
    return model


# ---- export ---------------------------------------------------------------------------------------

def resolve_model_config(ckpt: Path, model: Union[None, str, ModelConfig] = None) -> ModelConfig:
    """The model config of a checkpoint: given, or CKPT/configs/model/hf.yaml (an import), or the
    `model` section of the run's config.yaml (a trainer checkpoint <run>/checkpoints/step_N)."""
    if isinstance(model, ModelConfig):
        return model
    if model is not None:
        return load_model_config(model)
    if (ckpt / MODEL_YAML).exists():
        return load_model_config(str(ckpt / MODEL_YAML))
    run_cfg = find_run_config(ckpt)
    if run_cfg is not None:
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(run_cfg)["model"])
        return OmegaConf.to_object(merged).validate()
    raise ConfigError(f"no model config for {ckpt}: expected {ckpt / MODEL_YAML} or a run's "
                      f"config.yaml two levels up; pass --model NAME_OR_YAML")


def _run_config(ckpt: Path) -> dict:
    """The run's resolved config.yaml as a dict ({} when the checkpoint is not a run's)."""
    run_cfg = find_run_config(ckpt)
    if run_cfg is None:
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_cfg))


def _hf_source_dirs(ckpt: Path) -> list[Path]:
    """Where the weights' HF config and tokenizer files are, most specific first: an import's own
    copies (CKPT/hf_config.json, CKPT/hf_extra/), those of the run's `train.init_from` import, and
    the run's `train.init_from_hf` directory."""
    train = _run_config(ckpt).get("train", {})
    dirs = [ckpt]
    if train.get("init_from"):
        dirs.append(Path(train["init_from"]))
    if train.get("init_from_hf"):
        dirs.append(Path(train["init_from_hf"]))
    return dirs


def _source_hf_config(ckpt: Path) -> Optional[dict]:
    """The config.json the weights came from (see _hf_source_dirs), or None."""
    for d in _hf_source_dirs(ckpt):
        if (d / HF_CONFIG).exists():                    # an import
            return json.loads((d / HF_CONFIG).read_text())
        if d != ckpt and (d / "config.json").exists():  # an HF directory
            return json.loads((d / "config.json").read_text())
    return None


def _side_files(ckpt: Path) -> dict[str, Path]:
    """The tokenizer, processor and generation files to ship with an export: each name from the
    first HF source that has it (see _hf_source_dirs); without a tokenizer there, the run's
    `data.tokenizer` (a tokenizer.json; the shipped smoke tokenizer when unset)."""
    found: dict[str, Path] = {}
    for d in _hf_source_dirs(ckpt):
        for where in ((d / HF_EXTRA, d) if d != ckpt else (d / HF_EXTRA,)):
            for f in SIDE_FILES:
                if (where / f).is_file():
                    found.setdefault(f, where / f)
    if "tokenizer.json" not in found and find_run_config(ckpt) is not None:
        from data.tokenizer import SMOKE_TOKENIZER_PATH

        tok = _run_config(ckpt).get("data", {}).get("tokenizer") or SMOKE_TOKENIZER_PATH
        if Path(tok).is_file():
            found["tokenizer.json"] = Path(tok)
    return found


def _tokenizer_config(tokenizer_json: Path) -> dict:
    """A tokenizer_config.json for a bare tokenizer.json, so that AutoTokenizer loads the export."""
    added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
    names = {t["content"] for t in added}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for field, cand in (("eos_token", ("<|endoftext|>", "<|im_end|>")), ("pad_token", ("<|pad|>",))):
        tok = next((c for c in cand if c in names), None)
        if tok:
            cfg[field] = tok
    return cfg


def export_dtype(ckpt: Path) -> torch.dtype:
    """The dtype of the HF checkpoint the weights were imported from; bfloat16 when there is none."""
    from train.checkpoint.hf_files import config_dtype

    return config_dtype(_source_hf_config(ckpt) or {}) or torch.bfloat16


def export_checkpoint(ckpt: Union[str, Path], out: Union[str, Path], family: Optional[str] = None,
                      model: Union[None, str, ModelConfig] = None, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = 5 * 2 ** 30, fused_experts: bool = False,
                      skip_mtp: bool = False, overwrite: bool = False,
                      load_bytes: int = 1 << 30) -> Path:
    """Write config.json, safetensors shards + model.safetensors.index.json and the tokenizer
    files of a project DCP checkpoint (an import, or a trainer's sharded <run>/checkpoints/step_N)
    that transformers loads as `family`'s class. dtype None: the source HF checkpoint's
    (export_dtype). Streams: the rules' tensors are read from DCP in batches of about `load_bytes`
    (one DCP read each; a larger rule alone), converted and appended to their shard file tensor by
    tensor, so memory holds one batch (or one rule's tensors: an expert stack), never the model."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    dtype = dtype or export_dtype(ckpt)
    cfg = resolve_model_config(ckpt, model)
    if skip_mtp:
        cfg = dataclasses.replace(cfg, mtp_num_layers=0)
    base = _source_hf_config(ckpt)
    if family is None:
        family = base["model_type"] if base and base.get("model_type") in FAMILIES else default_family(cfg)
    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r}: supported are {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    hf_config = model_to_hf_config(cfg, family, base, dtype=dtype_name(dtype))

    stored = dcp_model_shapes(ckpt)
    ours = _our_shapes(cfg)
    for k, shape in ours.items():
        if k not in stored:
            raise ConversionError(f"checkpoint {ckpt} has no model.{k}: it does not match the model "
                                  f"config {cfg.name!r}")
        if stored[k][0] != shape:
            raise ConversionError(f"checkpoint {ckpt}: model.{k} has shape {tuple(stored[k][0])}, the "
                                  f"config implies {tuple(shape)}")
    rules = model_rules(cfg, fam, [k for k in ours if k.startswith("visual.")],
                        fused_experts=lambda prefix: fused_experts)
    check_rules_cover(rules, ours)
    hf_shapes = expected_hf_shapes(rules, ours)
    size = torch.empty((), dtype=dtype).element_size()
    group_bytes = [sum(hf_shapes[k].numel() for k in r.theirs) * size for r in rules]
    shards = plan_shards(group_bytes, max_shard_bytes)

    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for n, idx in enumerate(shards):
        name = SINGLE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(k, hf_shapes[k], dtype) for i in idx for k in rules[i].theirs]
        writer = SafetensorsWriter(tmp / name, entries)
        for batch in plan_shards([group_bytes[i] for i in idx], load_bytes):
            rs = [rules[idx[j]] for j in batch]
            loaded = load_dcp_tensors(ckpt, [k for r in rs for k in r.ours], stored)
            for r in rs:
                for k, t in zip(r.theirs, r.to_theirs([loaded[k] for k in r.ours])):
                    writer.write(k, t.to(dtype))
            del loaded
        writer.close()
        total += writer.total
        weight_map.update({k: name for k, _, _ in entries})
    # transformers reads the index whenever there is one; a single file gets one too.
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                        indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name, source in _side_files(ckpt).items():
        shutil.copy2(source, tmp / name)
    if (tmp / "tokenizer.json").exists() and not (tmp / "tokenizer_config.json").exists():
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(_tokenizer_config(tmp / "tokenizer.json"), indent=2) + "\n")
    fsync_dir(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def plan_shards(group_bytes: list[int], max_shard_bytes: int) -> list[list[int]]:
    """Groups (one rule's tensors each, never split) packed in order into shards of at most
    max_shard_bytes (a larger group gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(group_bytes):
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards
