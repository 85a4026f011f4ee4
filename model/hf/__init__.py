"""Hugging Face interop: import and export the released Qwen3.5 / Qwen3-Next checkpoints.

    python -m model.hf import --hf-dir DIR --out CKPT      # HF directory -> DCP checkpoint + config
    python -m model.hf export --ckpt CKPT --out DIR        # DCP checkpoint -> HF directory

Python API:
- `load_pretrained(DIR) -> Qwen35LM` with the checkpoint's weights;
- `logits(model, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
  video_grid_thw=None, attention_mask=None) -> [B, T, vocab]`, taking a transformers processor's outputs;
- `import_checkpoint`, `export_checkpoint`, `to_hf_state_dict`, `hf_to_model_config`,
  `model_to_hf_config`.
Only safetensors and json are used at run time; transformers is needed by the tests alone.
"""

from model.hf.config_map import FAMILIES, hf_to_model_config, model_to_hf_config
from model.hf.convert import (ConversionError, export_checkpoint, import_checkpoint, load_pretrained,
                              to_hf_state_dict)
from model.hf.inputs import logits

__all__ = ["FAMILIES", "ConversionError", "export_checkpoint", "hf_to_model_config", "import_checkpoint",
           "load_pretrained", "logits", "model_to_hf_config", "to_hf_state_dict"]
