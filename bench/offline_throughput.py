"""Offline throughput: minivllm's LLM.generate against Hugging Face transformers, same weights.

CPU (the foundation issue's target):
    python -m bench.offline_throughput --dtype float32 bfloat16 --num-prompts 1 16 \
        --output-len 128 --json bench/results/offline_cpu.json
GPU (the ragged workload nano-vllm publishes):
    python -m bench.offline_throughput --model qwen2.5-0.5b --load-format dummy \
        --workload ragged --num-prompts 256 --dtype bfloat16 --peers hf hf-cb --json ...
GPU batch-size sweep (every request 128 prompt + 128 output tokens, so that a static batch
wastes nothing on padding; plotted by `bench.plot_gpu --by-batch`):
    python -m bench.offline_throughput --model qwen2.5-0.5b --load-format dummy \
        --workload fixed --prompt-len 128 --output-len 128 --num-prompts 1 4 16 64 128 256 \
        --dtype bfloat16 --peers hf --json ...

Both engines get the same weights (loaded once through minivllm's loader and copied into the
transformers model), the same prompt token ids, and generate exactly the requested number of
tokens (EOS ignored). Output tokens/s counts requested tokens only.
"""
from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Optional

import numpy as np
import torch
import transformers

from bench import records
from minivllm import LLM, SamplingParams
from minivllm.config import CUDA_GRAPH_MODES, KERNEL_SETS, ArchConfig
from minivllm.loader import load_weights

TOPICS = ["the sea", "volcanoes", "bread", "chess", "the moon", "bees", "trains", "rain",
          "coffee", "maps", "glass", "owls", "rivers", "music", "clocks", "salt"]


def chat_workload(llm: LLM, n: int, output_len: int) -> list[tuple[list[int], int]]:
    tok = llm.get_tokenizer()
    return [(tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": f"Tell me a long story about {TOPICS[i % len(TOPICS)]}."}])),
        output_len) for i in range(n)]


def chat_token_work(n: int, output_len: int) -> list[tuple[list[int], int]]:
    """chat_workload's prompts as token ids of the embedded model, made without a full engine."""
    llm = LLM(kernels="torch", dtype="float32", num_blocks=8)
    return chat_workload(llm, n, output_len)


def ragged_workload(vocab: int, n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(n)]
    return [([rng.randint(10, vocab - 10) for _ in range(p)], o) for p, o in lens]


def fixed_workload(vocab: int, n: int, prompt_len: int, output_len: int,
                   seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randint(10, vocab - 10) for _ in range(prompt_len)], output_len)
            for _ in range(n)]


def make_workload(args, llm: LLM, n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    vocab = llm.engine.source.arch.vocab_size
    if args.workload == "chat":
        return chat_workload(llm, n, args.output_len)
    if args.workload == "ragged":
        return ragged_workload(vocab, n, seed)
    return fixed_workload(vocab, n, args.prompt_len, args.output_len, seed)


def run_minivllm(llm: LLM, work, steps: Optional[dict] = None) -> float:
    """Output tok/s of `work`; `steps` (a dict): filled with the run's engine steps by kind."""
    prompts = [ids for ids, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in work]
    engine, times = llm.engine, []
    step = engine.step
    if steps is not None:
        def timed():
            t = time.perf_counter()
            out = step()
            times.append((time.perf_counter() - t, engine.last_batch))
            return out
        engine.step = timed
    _sync()
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine.__dict__.pop("step", None)
    _sync()
    elapsed = time.perf_counter() - t0
    assert [len(o.outputs[0].token_ids) for o in outs] == [o for _, o in work]
    if steps is not None:
        steps.update(steps_by_kind(times))
    return sum(o for _, o in work) / elapsed


def steps_by_kind(times: list) -> dict:
    """(wall s of a step() call, its batch) by kind: decode (one token a row), mixed (a
    prefill chunk beside decodes), prefill (chunks alone), none. Under async scheduling a
    call's wall time is its host work or the step before it on the GPU, whichever is longer."""
    kinds: dict = {}
    for wall, batch in times:
        if batch is None:
            kind = "none"
        elif batch.num_tokens == batch.num_seqs:
            kind = "decode"
        else:
            kind = "prefill" if (np.diff(batch.query_start_loc) > 1).all() else "mixed"
        k = kinds.setdefault(kind, {"steps": 0, "wall_s": 0.0, "tokens": 0, "seqs": 0})
        k["steps"] += 1
        k["wall_s"] += wall
        k["tokens"] += 0 if batch is None else batch.num_tokens
        k["seqs"] += 0 if batch is None else batch.num_seqs
    for k in kinds.values():
        k["ms_per_step"] = 1e3 * k["wall_s"] / k["steps"]
        k["tokens_per_step"] = k["tokens"] / k["steps"]
    return kinds


def hf_config(arch: ArchConfig) -> dict:
    """`arch` as a Hugging Face config.json: what transformers (the oracle of the tests and
    benchmarks) and the CPU peers build the same network from."""
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch.architecture == "llama"
                          else "Qwen2ForCausalLM"],
        "model_type": arch.architecture,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": list(arch.eos_token_ids) or None,
        "torch_dtype": arch.torch_dtype,
    }
    if arch.architecture == "llama":
        cfg["attention_bias"] = arch.attention_bias
        cfg["mlp_bias"] = False
    if arch.rope_scaling:
        cfg["rope_scaling"] = arch.rope_scaling
    return cfg


def hf_model(llm: LLM, dtype: torch.dtype, seed: int):
    """A transformers model holding exactly the weights minivllm loaded."""
    source = llm.engine.source
    config = transformers.AutoConfig.for_model(**hf_config(source.arch))
    device = llm.engine.runner.device
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dict(load_weights(source, dtype, device, seed)),
                                                strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if source.arch.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def run_hf_static(model, work, batch_size: int) -> float:
    """transformers generate, static batches with left padding; counts requested tokens."""
    _sync()
    t0 = time.perf_counter()
    for i in range(0, len(work), batch_size):
        chunk = work[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        new = max(o for _, o in chunk)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == width + new
    _sync()
    return sum(o for _, o in work) / (time.perf_counter() - t0)


def run_hf_continuous(model, work) -> float:
    """transformers' continuous batching through its manager, each request with its own output
    length (generate_batch gives every request the longest one). Not under inference_mode: the
    manager's thread updates tensors in place outside it."""
    config = transformers.GenerationConfig(max_new_tokens=max(o for _, o in work), do_sample=False,
                                           eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    done = {}
    try:
        _sync()
        t0 = time.perf_counter()
        for i, (ids, out_len) in enumerate(work):
            manager.add_request(ids, request_id=f"r{i}", max_new_tokens=out_len)
        while len(done) < len(work):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
            elif result.is_finished():
                done[result.request_id] = result
        _sync()
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    for i, (_, out_len) in enumerate(work):
        result = done[f"r{i}"]
        assert result.error is None and len(result.generated_tokens) == out_len, \
            (i, result.error, len(result.generated_tokens), out_len)
    return sum(o for _, o in work) / elapsed


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--workload", choices=["chat", "ragged", "fixed"], default="chat")
    ap.add_argument("--prompt-len", type=int, default=128, help="the fixed workload's prompts")
    ap.add_argument("--peers", nargs="*", default=["hf"], choices=["hf", "hf-cb"])
    ap.add_argument("--hf-batch", type=int, default=0, help="static batch size (0: all at once)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--kernels", default=None, choices=["auto", *KERNEL_SETS],
                    help="a kernel set other than auto ($MINIVLLM_KERNELS)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--cuda-graph-mode", default="full", choices=CUDA_GRAPH_MODES)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="default: the engine's (on for CUDA)")
    # Our KV cache takes this fraction of free GPU memory; the peers run in the same process
    # after us and need room for their own caches.
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    for dtype_name in args.dtype:
        llm = LLM(args.model, load_format=args.load_format, dtype=dtype_name,
                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                  kernels=args.kernels, enforce_eager=args.enforce_eager,
                  cuda_graph_mode=args.cuda_graph_mode,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  async_scheduling=args.async_scheduling)
        dtype = llm.engine.runner.dtype
        peer = hf_model(llm, dtype, 0) if args.peers else None
        name = llm.engine.source.name
        for n in args.num_prompts:
            work = make_workload(args, llm, n)
            # Warm-up: a whole run of the same shape on other prompts (the workload's own would
            # be served from the prefix cache in the timed run). A short one leaves first-use
            # costs in the timed run: on the H100 a ragged run after a 2-prompt warm-up gave
            # 15.8k tok/s, the next run of fresh prompts 38.7k (Triton compiling kernel
            # variants, allocator growth).
            run_minivllm(llm, chat_workload(llm, 2, 16) if args.workload == "chat"
                         else make_workload(args, llm, n, seed=1))
            steps: dict = {}
            ours = run_minivllm(llm, work, steps)
            for kind, k in steps.items():
                print(f"  {kind}: {k['steps']} steps, {k['wall_s']:.3f} s, "
                      f"{k['ms_per_step']:.2f} ms a step, {k['tokens_per_step']:.0f} tokens a step")
            label = f"{name} {dtype_name} {args.workload} n={n}"
            peers = {}
            if "hf" in args.peers:
                run_hf_static(peer, work[:1], 1)
                peers["transformers generate"] = run_hf_static(peer, work, args.hf_batch or n)
            if "hf-cb" in args.peers and hasattr(peer, "init_continuous_batching"):
                run_hf_continuous(peer, [(ids, 16) for ids, _ in work[:4]])  # warm-up
                peers["transformers continuous batching"] = run_hf_continuous(peer, work)
            best = max(peers.items(), key=lambda kv: kv[1]) if peers else (None, None)
            results.append(records.record(f"{label} minivllm", ours, "tok/s", peer=best[1],
                                          peer_name=best[0], num_prompts=n,
                                          async_scheduling=llm.engine.overlap,
                                          cuda_graph_mode=args.cuda_graph_mode,
                                          steps_by_kind=steps))
            results += [records.record(f"{label} {k}", v, "tok/s", num_prompts=n)
                        for k, v in peers.items()]
        del llm, peer
        gc.collect()
    records.write(args.json, results)


if __name__ == "__main__":
    main()
