"""Forward+backward time of the gated delta rule implementations on the same inputs, same process.

    python benchmarks/bench_gated_delta.py                     # B=1 T=4096 H=4 K=V=64 fp32
    python benchmarks/bench_gated_delta.py --seqlen 1024 --recurrent-repeats 0   # skip the slow loop

Compares (a) our chunked path (PyTorch backend forced), (b) our step-by-step recurrent reference,
(c) transformers' PyTorch fallback `torch_chunk_gated_delta_rule` (Qwen3-Next). Torch threads are left
at their default. The ratio column is transformers' time divided by each row's time (higher = faster).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from model.ops.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule  # noqa: E402


def make_inputs(b, t, h, dk, dv, dtype, device, seed=0):
    """Realistic ranges: l2-normalised q/k (done in-kernel), β in (0,1), g = -softplus(.) <= 0."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen)
    k = torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, h, dv, generator=gen)
    g = -F.softplus(torch.randn(b, t, h, generator=gen) - 2.0)
    beta = torch.rand(b, t, h, generator=gen)
    h0 = torch.randn(b, h, dk, dv, generator=gen) * 0.1
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, g, beta, h0)]


def fwd_bwd(fn, leaves):
    """Seconds for one forward + backward of mean(o^2) + mean(S^2); returns (seconds, o)."""
    for x in leaves:
        x.grad = None
    start = time.perf_counter()
    o, s = fn(*leaves)
    (o.float().square().mean() + s.float().square().mean()).backward()
    if leaves[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, o.detach()


def time_interleaved(rows, inputs, warmup):
    """Median fwd+bwd seconds per row. Rows take turns each repeat, so load from other processes
    on a shared machine hits every implementation alike."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    for _, fn, reps in rows:
        for _ in range(warmup if reps > 1 else 0):
            fwd_bwd(fn, leaves)
    times, outs = {name: [] for name, _, _ in rows}, {}
    for i in range(max(reps for _, _, reps in rows)):
        for name, fn, reps in rows:
            if i < reps:
                sec, outs[name] = fwd_bwd(fn, leaves)
                times[name].append(sec)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats for the chunked paths")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--recurrent-repeats", type=int, default=1, help="repeats for the slow recurrent loop (0 = skip)")
    args = p.parse_args()

    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.batch, args.seqlen, args.heads, args.dk, args.dv, dtype, args.device)

    # all three: q/k l2-normalised in-kernel, scale K**-0.5, initial state in, final state out
    def ours_chunk(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True, backend="torch")  # fmt: skip

    def ours_recurrent(q, k, v, g, beta, h0):
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)  # fmt: skip

    def hf_chunk(q, k, v, g, beta, h0):
        # same [B,T,H,K] layout; initial_state [B,H,K,V]; returns (o, final_state or None)
        return torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                            use_qk_l2norm_in_kernel=True)  # fmt: skip

    rows = [("transformers torch_chunk", hf_chunk, args.repeats)]
    rows.append(("ours chunk (torch)", ours_chunk, args.repeats))
    if args.recurrent_repeats > 0:
        rows.append(("ours recurrent", ours_recurrent, args.recurrent_repeats))

    print(f"gated delta rule fwd+bwd: B={args.batch} T={args.seqlen} H={args.heads} K={args.dk} V={args.dv} "
          f"{args.dtype} {args.device} threads={torch.get_num_threads()}")  # fmt: skip
    med, outs = time_interleaved(rows, inputs, args.warmup)
    base, ref = med[rows[0][0]], outs[rows[0][0]].float()
    print(f"{'impl':<26}{'fwd+bwd ms':>12}{'repeats':>9}{'x vs hf':>9}{'max|o-o_hf|':>13}")
    for name, _, reps in rows:
        err = (outs[name].float() - ref).abs().max().item()
        print(f"{name:<26}{med[name] * 1e3:>12.1f}{reps:>9}{base / med[name]:>9.2f}{err:>13.2e}")

if __name__ == "__main__":
    main()
