"""GPU attention at long contexts, judged against the roofline measured in the same run.

    python -m bench.long_context --model llama-3-8b --shapes 1x7900 16x4000 --prefill 8000 \
        --json PATH
    python -m bench.long_context --model qwen2.5-0.5b --shapes 1x30000 32x8000 256x1000 \
        --prefill 16000 --sweep --json PATH

Dummy bf16 weights, random prompt ids, greedy, EOS ignored; the engine's own step loop
(EngineCore.step, CUDA graphs and async scheduling as served) is timed. Per shape BxC:

- decode step at context C and at context 128 (same batch, same engine); the step's floor
  (weights + the batch's KV read once) over the bandwidth ceiling, and the fraction reached;
  the time the long context adds against its allowance, 1.5 x (KV bytes / bandwidth + 3 us a
  layer);
- the attention kernel alone (bench/roofline.py's ceilings): one CUDA graph of one decode
  attention per layer over per-layer caches of BxC tokens (so the L2 cache holds none of it),
  KV bytes / time against the bandwidth ceiling.
Prefill of one prompt: the step's time against its FLOP floor (linear layers + causal
attention) at the measured bf16 matmul peak, and the prefill attention kernel alone.
`--sweep` times the kernels' tile and split settings at these shapes (which one the code
keeps is decided from it).
"""
from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time

import numpy as np
import torch

from bench import records, roofline
from minivllm import LLM, SamplingParams
from minivllm.layers.attention import AttentionMetadata
from minivllm.layers.triton_attention import TritonAttentionBackend

BASE_CONTEXT = 128
PER_LAYER_S = 3e-6  # the allowance's fixed cost per layer (launches, the combine pass)


def _shape(text: str) -> tuple[int, int]:
    batch, context = text.lower().split("x")
    return int(batch), int(context)


def decode_step_s(llm: LLM, batch: int, context: float, steps: int, rng: random.Random) -> float:
    """Median wall time of `steps` decode steps of `batch` requests at `context` tokens."""
    engine = llm.engine
    vocab = engine.source.arch.vocab_size
    warmup = 6
    # Room to spare: chunked prefills start the requests steps apart; they are aborted after.
    params = SamplingParams(temperature=0, max_tokens=warmup + steps + 64, ignore_eos=True)
    owners = range(batch)
    for i in owners:
        engine.add_request(i, [rng.randrange(10, vocab - 10) for _ in range(int(context))], params)
    started: set[int] = set()
    while len(started) < batch:  # prefill (chunked) until every request has its first token
        started.update(engine.step().owners.tolist())
    for _ in range(warmup):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        assert len(engine.step()) == batch  # the step waits for its sampled tokens
        times.append(time.perf_counter() - t0)
    for i in owners:
        engine.abort_request(i)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times)


def _caches(layers: int, rows: int, context: int, block_size: int, kv_heads: int,
            head_dim: int):
    """Per-layer K and V caches holding `rows` contexts of `context` tokens (random bf16), and
    a shuffled block order."""
    blocks = rows * -(-context // block_size)
    shape = (blocks, block_size, kv_heads, head_dim)
    caches = [(torch.randn(shape, dtype=torch.bfloat16, device="cuda"),
               torch.randn(shape, dtype=torch.bfloat16, device="cuda")) for _ in range(layers)]
    return caches, torch.randperm(blocks, device="cuda").to(torch.int32)


def _meta(qlens: list[int], seq_lens: list[int], order: torch.Tensor, block_size: int):
    """Metadata of rows with these query and context lengths, blocks taken in `order`."""
    need = [-(-s // block_size) for s in seq_lens]
    tables = torch.zeros(len(qlens), max(need), dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = order[at:at + n]
        at += n
    starts = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int64)
    lens = np.array(seq_lens, dtype=np.int64)
    t = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    slots = torch.zeros(int(starts[-1]), dtype=torch.int64, device="cuda")
    return AttentionMetadata(slots, t(starts), t(lens), tables, starts, lens, max(qlens))


def decode_kernel_s(backend, arch, batch: int, context: int, layers: int, caches, order,
                    block_size: int) -> float:
    """Seconds per layer of the decode attention alone: batch rows of `context` tokens."""
    heads, head_dim = arch.num_attention_heads, arch.head_dim
    meta = _meta([1] * batch, [context] * batch, order, block_size)
    backend.prepare(meta, block_size)
    q = torch.randn(batch, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    scale = head_dim ** -0.5

    def all_layers():
        for k, v in caches[:layers]:
            backend.attend(q, k, v, out, meta, scale)

    all_layers()  # compiles
    torch.cuda.synchronize()
    return roofline.graph_time_s(all_layers) / layers


def prefill_kernel_s(backend, arch, tokens: int, caches, order, block_size: int) -> float:
    """Seconds of the prefill attention alone: one prompt of `tokens`, one layer."""
    heads, head_dim = arch.num_attention_heads, arch.head_dim
    meta = _meta([tokens], [tokens], order, block_size)
    backend.prepare(meta, block_size)
    q = torch.randn(tokens, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    k, v = caches[0]
    backend.attend(q, k, v, out, meta, head_dim ** -0.5)
    return roofline.median_s(lambda: backend.attend(q, k, v, out, meta, head_dim ** -0.5),
                              repeats=5)


def attention_flops(arch, tokens: int) -> float:
    """FLOPs of causal attention over one prompt, every layer: QK^T and PV over the
    tokens*(tokens+1)/2 (query, key) pairs."""
    pairs = tokens * (tokens + 1) / 2
    return 4 * pairs * arch.head_dim * arch.num_attention_heads * arch.num_hidden_layers


def prefill_step_s(llm: LLM, tokens: int, rng: random.Random, repeats: int = 3) -> float:
    engine = llm.engine
    vocab = engine.source.arch.vocab_size
    times = []
    for i in range(repeats + 1):
        ids = [rng.randrange(10, vocab - 10) for _ in range(tokens)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.add_request(10_000 + i, ids, SamplingParams(temperature=0, max_tokens=1))
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[(1, 30000)],
                    help="BATCHxCONTEXT decode shapes")
    ap.add_argument("--prefill", type=int, default=0, help="prompt length of the prefill run")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per shape")
    ap.add_argument("--sweep", action="store_true", help="time the kernels' tile/split knobs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ceil = roofline.measure()
    bw = ceil["bandwidth"]
    max_batch = max(b for b, _ in args.shapes)
    max_len = max([c for _, c in args.shapes] + [args.prefill]) + args.steps + 16
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=max_batch,
              max_model_len=max_len, max_num_batched_tokens=max(args.prefill, 2048),
              enable_prefix_caching=False, gpu_memory_utilization=0.45)
    arch, layers = llm.engine.source.arch, llm.engine.source.arch.num_hidden_layers
    block_size = llm.engine.runner.kv_spec.block_size
    wbytes, kvtok = roofline.weight_bytes(llm), roofline.kv_bytes_per_token(llm)
    rng = random.Random(0)
    name = f"{args.model} bf16"
    recs = [records.record("ceiling: device copy bandwidth (read + write)",
                           ceil["copy_bytes_per_s"] / 1e12, "TB/s"),
            records.record("ceiling: read-only stream bandwidth (sum of 4 GiB)",
                           ceil["read_bytes_per_s"] / 1e12, "TB/s"),
            records.record("ceiling: bf16 matmul 8192^3", ceil["matmul_flops"] / 1e12,
                           "TFLOP/s")]
    backend = TritonAttentionBackend()
    for batch, context in args.shapes:
        base = decode_step_s(llm, batch, BASE_CONTEXT, args.steps, rng)
        step = decode_step_s(llm, batch, context, args.steps, rng)
        kv = batch * context * kvtok
        floor = (wbytes + kv) / bw
        allowance = 1.5 * (kv / bw + PER_LAYER_S * layers)
        shape = f"{name} decode batch {batch} context {context}"
        recs += [
            records.record(f"{shape}: step", step * 1e3, "ms", floor_ms=floor * 1e3,
                           fraction_of_floor=floor / step, weight_bytes=wbytes, kv_bytes=kv,
                           bandwidth_bytes_per_s=bw),
            records.record(f"{shape}: time added over context {BASE_CONTEXT}",
                           (step - base) * 1e3, "ms", allowance_ms=allowance * 1e3,
                           within_allowance=(step - base) <= allowance,
                           step_at_base_ms=base * 1e3)]
        caches, order = _caches(layers, batch, context, block_size, arch.num_key_value_heads,
                                arch.head_dim)
        kernel = decode_kernel_s(backend, arch, batch, context, layers, caches, order,
                                 block_size)
        per_layer_kv = kv / layers
        recs.append(records.record(f"{shape}: attention kernel alone, per layer", kernel * 1e6,
                                   "us", kv_bytes=per_layer_kv,
                                   fraction_of_bandwidth=per_layer_kv / kernel / bw,
                                   splits=backend.decode_splits(batch, arch.num_key_value_heads)))
        if args.sweep:
            best = None
            for knobs in itertools.product(((64, 512, 8), (128, 64, 4), (128, 128, 4),
                                            (128, 256, 8), (256, 128, 4)),
                                           (64, 128), (2, 4), (1, 3), (False, True)):
                trial = TritonAttentionBackend()
                (trial.MIN_SPLIT, trial.MAX_SPLITS, trial.WAVES), trial.DECODE_BLOCK_N, \
                    trial.DECODE_WARPS, trial.DECODE_STAGES, trial.FUSED_COMBINE = knobs
                try:
                    t = decode_kernel_s(trial, arch, batch, context, layers, caches, order,
                                        block_size)
                except Exception as exc:  # out of shared memory or registers: say so, go on
                    print(f"decode knobs {knobs}: {type(exc).__name__}: {exc}")
                    continue
                label = (f"MIN_SPLIT {knobs[0][0]} MAX_SPLITS {knobs[0][1]} WAVES {knobs[0][2]} "
                         f"DECODE_BLOCK_N {knobs[1]} warps {knobs[2]} stages {knobs[3]} "
                         f"FUSED_COMBINE {knobs[4]}")
                recs.append(records.record(f"{shape}: sweep {label}", t * 1e6, "us",
                                           fraction_of_bandwidth=per_layer_kv / t / bw))
                best = min(best or (t, label), (t, label))
            if best is not None:
                print(f"{shape}: fastest decode knobs {best[1]}: {best[0] * 1e6:.2f} us "
                      f"({per_layer_kv / best[0] / bw:.0%} of the bandwidth)", flush=True)
        del caches
        torch.cuda.empty_cache()
    if args.prefill:
        p = args.prefill
        step = prefill_step_s(llm, p, rng)
        linear = sum(m.weight.numel() for n, m in llm.engine.runner.model.named_modules()
                     if isinstance(getattr(m, "weight", None), torch.Tensor)
                     and m.weight.dim() == 2 and "embed" not in n and "lm_head" not in n)
        flops = 2 * linear * p + attention_flops(arch, p)
        shape = f"{name} prefill of one {p}-token prompt"
        recs.append(records.record(f"{shape}: step", step * 1e3, "ms",
                                   floor_ms=flops / ceil["matmul_flops"] * 1e3, flops=flops,
                                   fraction_of_matmul_peak=flops / step / ceil["matmul_flops"]))
        caches, order = _caches(1, 1, p, block_size, arch.num_key_value_heads, arch.head_dim)
        per_layer = attention_flops(arch, p) / layers
        tiles = 64 if arch.head_dim <= 64 else 128
        configs = [backend.PREFILL_TILES[tiles]]
        if args.sweep:
            configs += [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
                        if c != configs[0]]
        for bm, bn, warps, stages in configs:
            trial = TritonAttentionBackend()
            trial.PREFILL_TILES = {tiles: (bm, bn, warps, stages)}
            try:
                t = prefill_kernel_s(trial, arch, p, caches, order, block_size)
            except Exception as exc:  # a tile too big for shared memory: say so, go on
                print(f"prefill config {bm}x{bn} w{warps} s{stages}: {exc}")
                continue
            recs.append(records.record(
                f"{shape}: attention kernel alone, one layer, BLOCK_M {bm} BLOCK_N {bn} "
                f"warps {warps} stages {stages}", t * 1e3, "ms",
                tflops=per_layer / t / 1e12,
                fraction_of_matmul_peak=per_layer / t / ceil["matmul_flops"]))
    records.write(args.json, recs)


if __name__ == "__main__":
    main()
