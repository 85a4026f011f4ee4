"""Token-mixing kernels: a readable PyTorch reference next to each fast path."""

from model.ops.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule, set_default_backend

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "set_default_backend"]
