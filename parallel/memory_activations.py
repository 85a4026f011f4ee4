"""Saved activations of one micro-batch, per module, as parallel/memory.py sums them.

Each function returns the bytes autograd keeps from a module's forward until its backward, for
`n` tokens on one rank, read off the module's code (what each op saves; outputs that only feed an
op which does not save them are freed). `a` is the activation dtype's size (2 under bf16 autocast,
4 in fp32); norms, the router, the GDN decay and the cross-entropy stay fp32 whatever `a` is.
tests/test_memory.py checks the sums against a live-tensor measurement (parallel/memory_tracker.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.attention_backend import BLOCK_TOKENS
from model.config import ModelConfig
from model.ops.gated_delta_chunk import CHUNK_SIZE


@dataclass(frozen=True)
class ActShape:
    """Token counts and dtypes of one micro-batch on one rank."""

    tokens: int             # N = rows x seq_len: what the mixers and the MoE see (gathered under SP)
    seq_len: int            # T
    tp: int = 1
    sp: bool = True         # sequence parallel: the residual stream and the norms hold N / tp
    a: int = 2              # activation bytes
    gdn_kernel: str = "fla"      # fla | torch (CPU: chunk factors kept) | torch_recompute
    attention_kernel: str = "flash"   # flash (GPU) | cpu (GQA expansion and copies are saved)
    gdn_pad: float = 1.0    # padded chunk tokens / tokens (documents are padded to CHUNK_SIZE)

    @property
    def residual_tokens(self) -> int:
        return self.tokens // self.tp if self.sp else self.tokens


def norm_bytes(n: int, d: int) -> int:
    """RMSNorm over d channels: the fp32 input (or its fp32 copy), the normalised y and the rsqrt
    [n, 1]; the output is counted by the ops that save it."""
    return n * (8 * d + 4)


def attention_bytes(cfg: ModelConfig, s: ActShape) -> int:
    """Gated attention, heads split over tp (KV heads replicated, one used, when tp > KV heads)."""
    n, a, hd = s.tokens, s.a, cfg.head_dim
    hq = cfg.num_attention_heads // s.tp
    hkv = max(1, cfg.num_key_value_heads // s.tp)
    out = norm_bytes(n * hq, hd) + norm_bytes(n * hkv, hd)        # q_norm, k_norm
    if a == 4:
        out += n * hq * hd * 4      # fp32: q_norm's input is a view of q_proj's [q | gate] output
    out += n * (hq + 2 * hkv) * hd * a                               # rotated q, k and v
    out += n * hq * (hd * a + 4)                                     # SDPA output + logsumexp
    if s.attention_kernel == "cpu":
        out += n * 3 * hq * hd * a  # CPU kernel: k, v expanded to the query heads, a contiguous q
        # The sdpa backend's masks of blocks of short documents (at most BLOCK_TOKENS queries and
        # keys each), which the CPU kernel keeps as additive masks in the activation dtype.
        out += n * BLOCK_TOKENS * a
    out += 2 * n * hq * hd * a                                       # sigmoid(gate), o_proj input
    return out


def gdn_bytes(cfg: ModelConfig, s: ActShape) -> int:
    """Gated DeltaNet: projections, the causal conv, the chunked kernel's saved tensors, the gated
    norm. fla saves its inputs and A [N, H, 64] fp32 (recomputing the rest in backward); the
    PyTorch path (model/ops/gated_delta_chunk.py) saves its chunked inputs, the chunk-start states
    h [M, H, K, V] and V', and on CPU the intra-chunk factors (Γ, KKᵀ, A, P: [M, H, C, C] each)."""
    n, a = s.tokens, s.a
    hk, hv = cfg.linear_num_key_heads // s.tp, cfg.linear_num_value_heads // s.tp
    dk, dv, k = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    c = 2 * hk * dk + hv * dv                                        # q | k | v channels
    out = n * c * a * (1 + k + 1)       # qkv, conv (one product per tap + its output), silu out
    out += n * (k - 1) * 4 + n * (8 * hk + 16 * hv)  # conv masks, l2norm rstd, beta, g, softplus
    if s.gdn_kernel == "fla":
        out += n * hv * ((2 * dk + dv) * a + 8 + CHUNK_SIZE * 4)    # q, k (repeated), v, g, beta, A
    else:
        m = n * s.gdn_pad   # padded chunk tokens, fp32 in the kernel
        kept = m * hv * ((2 * dk + dv) * 4 + 8 + dv * 4) + m / CHUNK_SIZE * hv * dk * dv * 4
        if s.gdn_kernel == "torch":     # Γ, KKᵀ, A, P; [U | W] (+ its solve input), K_dec, e^γ
            kept += m * hv * (4 * CHUNK_SIZE * 4 + 2 * (dk + dv) * 4 + dk * 4 + 8)
        out += int(kept)
    out += n * hv * dv * (6 * a) + n * hv * 4      # gated norm: o, y, w*y, z, silu(z), out; rsqrt
    return out


def mlp_bytes(d_ff: int, n: int, a: int) -> int:
    """SwiGLU: gate out, silu(gate), up out, the product (down's input)."""
    return n * 4 * d_ff * a


def moe_bytes(cfg: ModelConfig, s: ActShape, ep: int = 1) -> int:
    """Router (fp32 logits, probs, top-k), the routed copies (top_k x: sorted inputs, gate|up,
    silu, product, unpermuted outputs), the shared expert (split over tp). Under EP each rank's
    experts receive top_k x N rows on average (uniform routing); routed experts are not TP-split,
    so every tp rank routes the whole gathered sequence."""
    n, a, e, k, d = s.tokens, s.a, cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size
    i = cfg.moe_intermediate_size
    out = n * (4 * 3 * e + 4 * 3 * k + 8 * k + 8)                    # logits, probs, lse; top-k
    if a < 4:
        out += n * d * 4            # the router's fp32 copy of its input
    out += n * k * (d * a + 2 * i * a + i * a + i * a + d * a + 24)  # routed copies + indices
    if ep > 1:
        out += n * k * d * a        # the all-to-all's received rows (kept for the combine)
    si = cfg.shared_expert_intermediate_size // s.tp
    if si:
        out += mlp_bytes(si, n, a) + n * (d * a + 8)                 # + gated output, sigmoid
    return out


def layer_bytes(cfg: ModelConfig, i: int, s: ActShape, ep: int = 1) -> int:
    """Decoder layer i: two norms on the residual stream (N / tp under SP), the mixer and the MLP,
    each reading the gathered [N, D] input (saved by their projections)."""
    nr, d = s.residual_tokens, cfg.hidden_size
    out = 2 * norm_bytes(nr, d) + 2 * s.tokens * d * s.a
    mixer = cfg.resolved_layer_types()[i]
    out += attention_bytes(cfg, s) if mixer == "full_attention" else gdn_bytes(cfg, s)
    if cfg.layer_is_moe(i):
        out += moe_bytes(cfg, s, ep)
    else:
        out += mlp_bytes(cfg.intermediate_size // s.tp, s.tokens, s.a)
    return out


def layer_input_bytes(cfg: ModelConfig, s: ActShape) -> int:
    """What a fully checkpointed layer keeps: its input (the residual stream, N / tp under SP)."""
    return s.residual_tokens * cfg.hidden_size * s.a


def head_bytes(cfg: ModelConfig, s: ActShape) -> tuple[int, int]:
    """(saved, backward transient) of the final norm + LM head + CE, per LM-head use (the main one,
    then each MTP depth). CE in fp32 over the local vocabulary: log-softmax [N, V/tp] saved, its
    gradient and the logits' gradient live together at the start of backward (bf16 logits add
    their bf16 gradient)."""
    n, v, d = s.tokens, cfg.vocab_size // s.tp, cfg.hidden_size
    saved = norm_bytes(s.residual_tokens, d) + n * d * s.a + n * v * 4
    transient = n * v * 8 + (n * v * s.a if s.a < 4 else 0)
    return saved, transient


def mtp_bytes(cfg: ModelConfig, s: ActShape, ep: int = 1) -> int:
    """One MTP depth: two input norms, the fc over [N, 2D], a full-attention decoder layer, its
    final norm (the LM head's share is `head_bytes`)."""
    nr, d = s.residual_tokens, cfg.hidden_size
    out = 2 * norm_bytes(nr, d) + 2 * s.tokens * d * s.a
    mixer = attention_bytes(cfg, s)
    mlp = moe_bytes(cfg, s, ep) if cfg.mlp_type == "moe" else mlp_bytes(
        cfg.intermediate_size // s.tp, s.tokens, s.a)
    return out + 2 * norm_bytes(nr, d) + 2 * s.tokens * d * s.a + mixer + mlp


def vision_bytes(cfg: ModelConfig, patches: int, a: int) -> int:
    """The ViT over `patches` patches (each rank encodes its own share): per block two LayerNorms
    (fp32), qkv, attention output + logsumexp, the MLP's fc1 output and activation, plus the
    merger. A rough count: the tower is small next to the decoder at training sequence lengths."""
    v = cfg.vision
    if v is None or patches == 0:
        return 0
    dv, iv = v.hidden_size, v.intermediate_size
    per_block = patches * (2 * norm_bytes(1, dv) + 2 * dv * a + 3 * dv * a + dv * a
                           + 4 * v.num_heads + 2 * iv * a)
    merged = patches * dv * (4 + 2 * a)
    return v.depth * per_block + merged
