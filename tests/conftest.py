import os

import pytest
import torch

# Two cores: keep intra-op threads fixed so timings and reductions are stable across runs.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def tiny_cfg():
    from model.config import load_model_config

    return load_model_config("tiny")
