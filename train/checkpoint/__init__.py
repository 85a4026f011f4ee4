"""Checkpoint I/O: the training checkpoints (DCP, sharded, committed atomically with checksums,
synchronous or asynchronous) and Hugging Face checkpoint files (read shard by shard into a
parallelised model, import, export). model/hf holds the name and layout mapping these use.

- `save_load`: save / load / resume selection / pruning of the trainer's checkpoints;
- `commit`: commit records (COMMITTED with each file's size and CRC-32) and their verification;
- `async_save`: `AsyncCheckpointer`, staging to host memory and writing in the background;
- `hf_files`: safetensors directories (memory-mapped slice reads, a streaming writer);
- `hf_shards`: `train.init_from_hf`: each rank reads only its shards' slices of an HF directory;
- `hf_convert`, `hf_dcp`, `hf_cli`: `python -m model.hf import|export` and `load_pretrained`.
"""

from train.checkpoint.commit import MARKER
from train.checkpoint.save_load import (KEEP, DiskFullError, committed_checkpoints, latest_checkpoint, load_checkpoint,
                                        load_model_weights, protect_latest, prune, remove_unfinished,
                                        resumable_checkpoint,
                                        rng_state, save_checkpoint, set_rng_state, step_dir_name,
                                        training_state, verify_checkpoint, weights_finite)

__all__ = ["KEEP", "DiskFullError", "MARKER", "committed_checkpoints", "latest_checkpoint", "load_checkpoint",
           "load_model_weights", "protect_latest", "prune", "remove_unfinished", "resumable_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state", "step_dir_name", "training_state", "verify_checkpoint",
           "weights_finite"]
