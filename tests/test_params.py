"""Released configs build on the meta device and their parameter counts match the released figures."""

import json
import subprocess
import sys

import pytest

from model.summary import summarize

# (config, released total, released active per token, tolerance on active).
# The released names are rounded labels: "397B-A17B", "35B-A3B", "80B-A3B". Totals are checked to
# 3%. Active counts here include the embedding, LM head and the one MTP layer; "A3B" rounds
# 3.5B (35B) and 3.9B (80B) down, so the active tolerance is wider for the A3B models.
RELEASED = [
    ("qwen35_397b_a17b", 397e9, 17e9, 0.05),
    ("qwen35_35b_a3b", 35e9, 3e9, 0.20),
    ("qwen3_next_80b_a3b", 80e9, 3e9, 0.35),
]


@pytest.mark.parametrize("name,total,active,active_tol", RELEASED)
def test_released_parameter_counts(name, total, active, active_tol):
    info = summarize(name)
    assert info["total_params"] == pytest.approx(total, rel=0.03)
    assert info["active_params"] == pytest.approx(active, rel=active_tol)
    assert info["linear_attention_layers"] == 3 * info["full_attention_layers"]


def test_exact_count_of_35b_layer_shapes():
    """Recount Qwen3.5-35B-A3B by hand from the reference's shapes: catches a wrong projection."""
    d, v, L, E, k, I, Is = 2048, 248320, 40, 256, 8, 512, 512
    hk, hv, dk, dv = 16, 32, 128, 128
    gdn = d * (2 * hk * dk + hv * dv) + d * hv * dv + 2 * d * hv + (2 * hk * dk + hv * dv) * 4 \
        + 2 * hv + dv + hv * dv * d
    attn = d * 16 * 256 * 2 + 2 * d * 2 * 256 + 16 * 256 * d + 2 * 256
    moe = E * d + E * 3 * d * I + 3 * d * Is + d
    norms = 2 * d
    layers = 30 * (gdn + moe + norms) + 10 * (attn + moe + norms)
    mtp = 2 * d + 2 * d * d + (attn + moe + norms) + d
    # Vision tower (reference §6): Conv3d patch embed, 48x48 position table, 27 pre-LN blocks,
    # 2x2 merger into d. It is in the total, not in the per-token active count.
    vd, vm, vdepth = 1152, 4304, 27
    block = 4 * vd + (vd * 3 * vd + 3 * vd) + (vd * vd + vd) + (vd * vm + vm) + (vm * vd + vd)
    vision = (3 * 2 * 16 * 16 * vd + vd) + 2304 * vd + vdepth * block \
        + 2 * vd + (4 * vd * 4 * vd + 4 * vd) + (4 * vd * d + d)
    expected_total = 2 * v * d + layers + d + mtp
    info = summarize("qwen35_35b_a3b")
    assert info["vision_params"] == vision
    assert info["total_params"] == expected_total + vision
    inactive = (L + 1) * (E - k) * 3 * d * I
    assert info["active_params"] == expected_total - inactive


def test_summary_cli_json():
    out = subprocess.run([sys.executable, "-m", "model.summary", "qwen35_397b_a17b", "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["total_params"] > 3.9e11 and info["active_params"] < 1.9e10
    table = subprocess.run([sys.executable, "-m", "model.summary", "tiny"], capture_output=True,
                           text=True, check=True).stdout
    assert "total_params" in table and "active_params" in table


def test_train_flops_of_the_35b_proxy_by_hand():
    """Megatron-Bridge's count (model/params.py) for the proxy at seq 4096, in MACs per token."""
    from model.config import load_model_config
    from model.params import train_flops_per_token

    d, s = 2048, 4096
    moe = 3 * d * (512 * 8 + 512)                      # 8 routed experts + the shared one, SwiGLU
    k, v = 16 * 128, 32 * 128                          # Gated DeltaNet q/k and v widths
    gdn = d * (2 * k + 2 * v + 2 * 32) + 4 * (2 * k + v) + 4 * 32 * 128 * 128 + d * v
    q, kv = 16 * 256, 2 * 256
    attention = d * (q + 2 * kv + q) + q * d + q * s   # q, k, v, gate; o_proj; causal QK^T + AV
    head = d * 248_320
    assert (moe, gdn, attention) == (28_311_552, 35_815_424, 44_040_192)
    macs = 3 * (gdn + moe) + (attention + moe) + head  # layers 0-2 Gated DeltaNet, 3 attention
    assert train_flops_per_token(load_model_config("qwen35_35b_a3b_proxy"), s) == 6 * macs
    assert 6 * macs == 4_639_752_192


def test_train_flops_of_35b_match_megatron_bridge_recipe():
    """Megatron-Bridge's Qwen3.5-35B-A3B recipe (seq 4096) reports 185.6 model TFLOP/s per GPU at
    ~8.3k tokens/s per GPU: its FLOPs per token lie in 185.6e12 / [8.35k, 8.25k]."""
    from model.config import load_model_config
    from model.params import train_flops_per_token

    flops = train_flops_per_token(load_model_config("qwen35_35b_a3b"), 4096)
    assert 185.6e12 / 8350 <= flops <= 185.6e12 / 8250, flops
