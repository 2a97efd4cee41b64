"""Decode-shape linears: cuBLAS (F.linear) against a Triton GEMV, as a fraction of bandwidth.

    python -m bench.gemv_bench --json bench/results/gemv_h200.json     (on the GPU machine)

Issue 22 asks what stands between Llama-3-8B's batch-1 decode (76% of its bandwidth floor on
the H200) and the floor. The profiler puts the GPU busy for the whole step, so the kernels
themselves are slow: the linears read ~97% of the bytes. This measures them alone at the
models' shapes and batch sizes 1..16, each in a CUDA graph of back-to-back calls over enough
weight copies that none is read from L2, against the Triton kernel below with a sweep of its
tiles. The kernel is an experiment: the engine runs cuBLAS until this shows a win worth
wiring in (and the fused prologues it would allow: RMSNorm into the qkv and gate/up GEMVs,
SiLU-and-multiply into down's).

`_gemv_kernel`: one program per BLOCK_N output features, looping over K in BLOCK_K slices of
the weight rows (contiguous: each program streams whole rows); the batch's rows are padded to
16 for tl.dot, which costs nothing where the weight read is the bound.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from bench import records, roofline

SHAPES = {  # (out features N, in features K) of each linear, per model
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                   "down": (4096, 14336), "lm_head": (128256, 4096)},
    "qwen2.5-0.5b": {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896),
                     "down": (896, 4864), "lm_head": (151936, 896)},
}
LAYERS = {"llama-3-8b": 32, "qwen2.5-0.5b": 24}


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_om, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :],
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :],
                    mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(out_ptr + m[:, None] * stride_om + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, block_n: int, block_k: int,
         warps: int, stages: int) -> torch.Tensor:
    """out [M, N] = x [M, K] @ w [N, K]^T, M <= 16, bf16 in, fp32 accumulation."""
    M, K = x.shape
    N = w.shape[0]
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, w, out, M, N, K, x.stride(0), out.stride(0),
                                             BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=warps, num_stages=stages)
    return out


def _graph_s(fn, calls: int) -> float:
    """Seconds per call of fn(i) for i in range(calls), replayed from one CUDA graph."""
    def all_calls() -> None:
        for i in range(calls):
            fn(i)
    all_calls()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    return roofline.graph_time_s(all_calls) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw = roofline.read_bandwidth()
    recs = [records.record("ceiling: read-only stream bandwidth", bw / 1e12, "TB/s")]
    configs = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4)))
    for model in args.models:
        # time per step of the model's linears, each way: sum over shapes of layers x time
        step = {m: {"cublas": 0.0, "triton": 0.0} for m in args.batch}
        for name, (N, K) in SHAPES[model].items():
            copies = max(2, -(-400 * 2**20 // (N * K * 2)))  # > 400 MiB: out of L2
            weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
                       for _ in range(copies)]
            count = 1 if name == "lm_head" else LAYERS[model]
            for M in args.batch:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
                want = torch.nn.functional.linear(x.float(), weights[0].float())
                nbytes = N * K * 2
                t_cublas = _graph_s(lambda i: torch.mm(x, weights[i % copies].t(), out=out),
                                    copies)  # F.linear's cuBLAS call, into a fixed output
                best = None
                for bn, bk, warps, stages in configs:
                    try:
                        got = gemv(x, weights[0], out, bn, bk, warps, stages).float()
                        err = float((got - want).norm() / want.norm())
                        if err > 1e-2:
                            raise AssertionError(f"relative error {err:.2e}")
                        t = _graph_s(lambda i: gemv(x, weights[i % copies], out, bn, bk, warps,
                                                    stages), copies)
                    except Exception as exc:  # out of resources: say so, go on
                        print(f"{model} {name} M={M} {(bn, bk, warps, stages)}: "
                              f"{type(exc).__name__}: {exc}")
                        continue
                    best = min(best or (t, (bn, bk, warps, stages)), (t, (bn, bk, warps, stages)))
                step[M]["cublas"] += count * t_cublas
                step[M]["triton"] += count * (best[0] if best else t_cublas)
                label = f"{model} {name} ({N}x{K}) batch {M}"
                print(f"{label}: cuBLAS {t_cublas * 1e6:.1f} us ({nbytes / t_cublas / bw:.0%}), "
                      f"Triton {best[0] * 1e6:.1f} us ({nbytes / best[0] / bw:.0%}) "
                      f"BLOCK_N, BLOCK_K, warps, stages = {best[1]}" if best else
                      f"{label}: cuBLAS {t_cublas * 1e6:.1f} us; no Triton config ran",
                      flush=True)
                recs.append(records.record(f"{label}: cuBLAS", t_cublas * 1e6, "us",
                                           fraction_of_bandwidth=nbytes / t_cublas / bw))
                if best:
                    recs.append(records.record(
                        f"{label}: Triton GEMV, fastest tiles", best[0] * 1e6, "us",
                        fraction_of_bandwidth=nbytes / best[0] / bw, peer=t_cublas * 1e6,
                        peer_name="cuBLAS", tiles=dict(zip(("BLOCK_N", "BLOCK_K", "warps",
                                                            "stages"), best[1]))))
            weights.clear()
            torch.cuda.empty_cache()
        for M, t in step.items():
            print(f"{model} batch {M}: the linears of a step take {t['cublas'] * 1e3:.3f} ms "
                  f"in cuBLAS, {t['triton'] * 1e3:.3f} ms in the fastest Triton tiles", flush=True)
            recs.append(records.record(f"{model} batch {M}: linears of one step, Triton",
                                       t["triton"] * 1e3, "ms", peer=t["cublas"] * 1e3,
                                       peer_name="cuBLAS"))
    records.write(args.json, recs)


if __name__ == "__main__":
    main()
