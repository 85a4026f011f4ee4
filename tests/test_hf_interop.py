"""Hugging Face interop: tiny random checkpoints of each family built with transformers, imported,
compared logit by logit (text, images + a video, padding), exported, re-imported and loaded back
into transformers. transformers is used here only; model/hf and train/checkpoint need safetensors
and json alone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from hf_fixtures import VISION_IDS, multimodal_batch, rel_err, save_hf_model, text_batch
from model.config import ConfigError, load_model_config
from model.hf import logits, to_hf_state_dict
from model.hf.config_map import effective_mrope_section, hf_to_model_config
from train.checkpoint.hf_cli import main as hf_cli
from train.checkpoint.hf_convert import (ConversionError, export_checkpoint, import_checkpoint,
                                         load_pretrained)
from train.checkpoint.hf_files import HFReader

pytest.importorskip("transformers")

FAMILIES = ["qwen3_5", "qwen3_5_moe", "qwen3_next"]
VL = ["qwen3_5", "qwen3_5_moe"]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (transformers model, its save_pretrained dir), sharded so the index path is used."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        out[fam] = (save_hf_model(fam, d, max_shard_size="200KB"), d)
    return out


@pytest.fixture(scope="module")
def ours(hf_models):
    return {fam: load_pretrained(d) for fam, (_, d) in hf_models.items()}


def hf_state(path) -> dict[str, torch.Tensor]:
    reader = HFReader(path)
    return {k: reader.get(k) for k in reader.keys()}


# ---- parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_text_logits_match_transformers(family, hf_models, ours):
    hf, _ = hf_models[family]
    ids = text_batch(2, 80)
    with torch.no_grad():
        expect = hf(input_ids=ids).logits
        got = logits(ours[family], ids)
    assert got.shape == expect.shape == (2, 80, 1024)
    assert rel_err(got, expect) < TOL


@pytest.mark.parametrize("family", VL)
def test_image_and_video_logits_match_transformers(family, hf_models, ours):
    hf, _ = hf_models[family]
    batch = multimodal_batch()
    with torch.no_grad():
        expect = hf(**batch).logits
        got = logits(ours[family], **batch)
    assert rel_err(got, expect) < TOL
    # The vision tower matters: other pixels give other logits at and after the visual tokens.
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    with torch.no_grad():
        assert rel_err(logits(ours[family], **other), expect) > 1e-3


def test_left_padded_multimodal_batch_matches_transformers(hf_models, ours):
    hf, _ = hf_models["qwen3_5"]
    batch = multimodal_batch()
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    ids[1, :6] = 0  # row 1: six padding tokens on the left (the image starts after them)
    mask[1, :6] = 0
    batch.update(input_ids=ids, attention_mask=mask,
                 mm_token_type_ids=(ids == VISION_IDS["image_token_id"]).int()
                 + 2 * (ids == VISION_IDS["video_token_id"]).int())
    with torch.no_grad():
        expect = hf(**batch).logits
        got = logits(ours["qwen3_5"], **batch)
    keep = mask.bool()
    assert rel_err(got[keep], expect[keep]) < TOL


def test_tied_embeddings_import(tmp_path):
    hf = save_hf_model("qwen3_5", tmp_path, seed=3, tie_word_embeddings=True)
    assert "lm_head.weight" not in HFReader(tmp_path).keys()
    model = load_pretrained(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = text_batch(1, 40)
    with torch.no_grad():
        assert rel_err(logits(model, ids), hf(input_ids=ids).logits) < TOL


# ---- import / export -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_round_trip_and_transformers_reload(family, hf_models, ours, tmp_path, capsys):
    import transformers

    hf, src = hf_models[family]
    ckpt, exported = tmp_path / "ckpt", tmp_path / "export"
    assert hf_cli(["import", "--hf-dir", str(src), "--out", str(ckpt)]) == 0
    assert "train.init_from=" in capsys.readouterr().out
    assert (ckpt / "COMMITTED").exists() and (ckpt / ".metadata").exists()
    from train.checkpoint import verify_checkpoint

    assert verify_checkpoint(ckpt) == []  # a commit record with checksums, as the trainer's

    # The DCP checkpoint loads the way train.init_from does, into the model its YAML describes.
    from model.language_model import Qwen35LM
    from train.checkpoint import load_model_weights

    model = Qwen35LM(load_model_config(str(ckpt / "configs/model/hf.yaml")))
    load_model_weights(ckpt, model)
    for k, v in ours[family].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    # Export (fp32) gives back the original tensors under the original names: the identity.
    assert hf_cli(["export", "--ckpt", str(ckpt), "--out", str(exported), "--dtype", "float32",
                   "--max-shard-size", "300KB"]) == 0
    assert (exported / "model.safetensors.index.json").exists()
    original, back = hf_state(src), hf_state(exported)
    assert original.keys() == back.keys()
    for k in original:
        assert torch.equal(original[k], back[k]), k
    cfg_json = json.loads((exported / "config.json").read_text())
    assert cfg_json["architectures"] == [type(hf).__name__]

    # Re-import of the export is tensor-equal; transformers loads it and computes the same logits.
    again = load_pretrained(exported)
    for k, v in ours[family].state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    reloaded = transformers.AutoConfig.from_pretrained(exported)
    cls = type(hf)
    hf2 = cls.from_pretrained(exported, config=reloaded, dtype=torch.float32).eval()
    batch = multimodal_batch() if family in VL else {"input_ids": text_batch(2, 70)}
    with torch.no_grad():
        assert torch.equal(hf2(**batch).logits, hf(**batch).logits)
        assert rel_err(logits(again, **batch), hf2(**batch).logits) < TOL


def test_export_of_a_trained_run_finds_its_config(hf_models, tmp_path):
    """A trainer checkpoint (<run>/checkpoints/step_N) exports with the run's model config and the
    family of the checkpoint it was initialised from."""
    from omegaconf import OmegaConf

    from train.checkpoint import save_checkpoint
    from train.config import RootConfig

    _, src = hf_models["qwen3_next"]
    ckpt = import_checkpoint(src, tmp_path / "imported")
    model = load_pretrained(src)
    with torch.no_grad():
        model.norm.weight.add_(0.5)  # "training"
    run = tmp_path / "run"
    cfg = RootConfig(model=model.cfg)
    cfg.train.init_from = str(ckpt)
    run.mkdir()
    OmegaConf.save(OmegaConf.structured(cfg), run / "config.yaml")
    opt = torch.optim.AdamW(model.parameters())
    step = save_checkpoint(run / "checkpoints", 7, model, opt, {"step": 7})
    out = export_checkpoint(step, tmp_path / "hf", dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3NextForCausalLM"]
    assert torch.equal(load_pretrained(out).norm.weight, model.norm.weight)


def test_hydra_composes_the_imported_model_config(hf_models, tmp_path):
    from train.main import load_config

    _, src = hf_models["qwen3_5_moe"]
    ckpt = import_checkpoint(src, tmp_path / "ck", name="tiny_import")
    cfg = load_config(["model=hf", f"hydra.searchpath=[file://{ckpt}/configs]",
                       f"train.init_from={ckpt}"])
    assert cfg.model.name == "tiny_import" and cfg.model.vision is not None
    assert cfg.model.vision.image_token_id == VISION_IDS["image_token_id"]


def test_mtp_weights_map_to_the_mtp_block_and_back(hf_models, tmp_path):
    """Released checkpoints carry one MTP layer (mtp.fc, mtp.layers.0, ...) that transformers drops;
    it lands in the project's mtp.0 block and is exported under the same names."""
    from model.hf.config_map import FAMILIES as FAMS
    from model.hf.weights import expected_hf_shapes, model_rules
    from model.params import build_meta

    _, src = hf_models["qwen3_5_moe"]
    d = tmp_path / "with_mtp"
    shutil.copytree(src, d)
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(config))
    cfg = hf_to_model_config(config)
    shapes = {k: v.shape for k, v in build_meta(cfg).state_dict().items()}
    mtp_shapes = {k: s for k, s in expected_hf_shapes(model_rules(cfg, FAMS["qwen3_5_moe"]), shapes).items()
                  if k.startswith("mtp.")}
    assert "mtp.fc.weight" in mtp_shapes and "mtp.layers.0.mlp.experts.7.down_proj.weight" in mtp_shapes
    g = torch.Generator().manual_seed(0)
    mtp = {k: torch.randn(s, generator=g) for k, s in mtp_shapes.items()}
    save_file(mtp, str(d / "mtp.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    (d / "model.safetensors.index.json").write_text(json.dumps(index))

    model = load_pretrained(d)
    assert model.cfg.mtp_num_layers == 1
    assert torch.equal(model.mtp[0].fc.weight, mtp["mtp.fc.weight"])
    assert torch.equal(model.mtp[0].layer.self_attn.q_norm.weight, mtp["mtp.layers.0.self_attn.q_norm.weight"])
    ckpt = import_checkpoint(d, tmp_path / "ck")
    out = export_checkpoint(ckpt, tmp_path / "hf", dtype=torch.float32)
    back = hf_state(out)
    for k, v in mtp.items():
        assert torch.equal(back[k], v), k
    assert load_pretrained(d, skip_mtp=True).cfg.mtp_num_layers == 0


# ---- errors --------------------------------------------------------------------------------------

def _single_file_copy(src, dst, edit):
    """A single-file copy of a checkpoint with its state dict passed through edit(dict)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = hf_state(src)
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_unplaceable_and_misshapen_weights_are_errors_naming_them(hf_models, tmp_path):
    _, src = hf_models["qwen3_next"]
    missing = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    d = _single_file_copy(src, tmp_path / "a", lambda s: s.pop(missing))
    with pytest.raises(ConversionError, match=missing.replace(".", r"\.")):
        load_pretrained(d)
    d = _single_file_copy(src, tmp_path / "b", lambda s: s.update({"model.extra_thing.weight": torch.ones(2)}))
    with pytest.raises(ConversionError, match=r"no place.*model\.extra_thing\.weight"):
        import_checkpoint(d, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    bad = "model.layers.3.self_attn.k_proj.weight"
    d = _single_file_copy(src, tmp_path / "c", lambda s: s.update({bad: torch.ones(3, 64)}))
    with pytest.raises(ConversionError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight.*\(3, 64\)"):
        load_pretrained(d)
    assert hf_cli(["import", "--hf-dir", str(d), "--out", str(tmp_path / "ck")]) == 2


def test_unsupported_config_is_an_error_naming_the_field():
    config = {"model_type": "qwen3_next", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 1, "linear_num_key_heads": 1, "linear_num_value_heads": 1,
              "linear_key_head_dim": 8, "linear_value_head_dim": 8,
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        hf_to_model_config(config)
    with pytest.raises(ConfigError, match="model_type='llama'"):
        hf_to_model_config({"model_type": "llama"})


def test_mrope_sections_select_the_same_rows_as_transformers():
    from model.rope import mrope_row_of_frequency

    for section, freqs in (([11, 11, 10], 32), ([11, 11, 10], 4), ([2, 1, 1], 4), ([24, 20, 20], 64)):
        eff = effective_mrope_section(section, freqs)
        assert sum(eff) == freqs
        # transformers: h on slice(1, 3*s_h, 3), w on slice(2, 3*s_w, 3), t elsewhere.
        expect = torch.zeros(freqs, dtype=torch.long)
        expect[1:3 * section[1]:3] = 1
        expect[2:3 * section[2]:3] = 2
        assert torch.equal(mrope_row_of_frequency(freqs, eff), expect)


def test_export_refuses_what_transformers_cannot_compute(tmp_path):
    from model.hf import model_to_hf_config

    cfg = load_model_config("tiny")
    cfg.norm_topk_prob = False
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        model_to_hf_config(cfg, "qwen3_5_moe_text")
    model_to_hf_config(cfg, "qwen3_next")  # Qwen3-Next has the switch
    from model.language_model import Qwen35LM

    model = Qwen35LM(load_model_config("tiny"))
    model.layers[0].mlp.gate.expert_bias.fill_(0.1)
    with pytest.raises(ValueError, match="expert_bias is non-zero"):
        to_hf_state_dict(model)


def test_in_memory_conversion_builds_the_same_transformers_model():
    """to_hf_state_dict + the config dict give transformers' model without files (the benchmark's
    path): same logits for the tiny config, exported as the Qwen3.5-MoE text class."""
    import transformers

    from model.language_model import Qwen35LM

    torch.manual_seed(0)
    model = Qwen35LM(load_model_config("tiny")).eval()
    config, state = to_hf_state_dict(model, fused_experts=True)
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"]
    hf = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**config)).eval()
    hf.load_state_dict(state, strict=True)
    ids = text_batch(2, 70)
    with torch.no_grad():
        assert rel_err(hf(input_ids=ids).logits, logits(model, ids)) < TOL
