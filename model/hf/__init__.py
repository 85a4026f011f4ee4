"""Hugging Face interop, the pure part: names and layouts of the released Qwen3.5 / Qwen3-Next
checkpoints mapped to the project's, as functions on configs and tensors (no files are read here).

- `config_map`: config.json <-> ModelConfig (`hf_to_model_config`, `model_to_hf_config`,
  `model_config_mismatches`);
- `weights`: one `Rule` per group of tensors (renames, fused GDN projections, per-expert stacks,
  tied embeddings), each with the functions both ways and the `Part`s a shard reader needs;
- `state_dict`: `to_hf_state_dict(model)`, the HF state dict of an in-memory model;
- `inputs`: `logits(model, input_ids, pixel_values=..., ...)`, taking a transformers processor's outputs.

Reading and writing checkpoint files lives in train/checkpoint/ (DESIGN.md: model/ has no I/O):
`python -m model.hf import|export ...` (kept for its users) runs train/checkpoint/hf_cli.py, and
`load_pretrained`, `import_checkpoint`, `export_checkpoint` are in train/checkpoint/hf_convert.py.
"""

from model.hf.config_map import FAMILIES, hf_to_model_config, model_config_mismatches, model_to_hf_config
from model.hf.inputs import logits
from model.hf.state_dict import to_hf_state_dict

__all__ = ["FAMILIES", "hf_to_model_config", "logits", "model_config_mismatches", "model_to_hf_config",
           "to_hf_state_dict"]
