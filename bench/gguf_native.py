"""The embedded Q4_1 GGUF run 4-bit by minivllm's CPU kernels against llama.cpp on the same file.

    python -m bench.gguf_native run --json bench/results/gguf_native_cpu.json

Issue 20's protocol (shared/notes/cpu-peers.md): the 16 chat prompts of bench/cpu_paths.py (and
the first alone), the same token ids on every engine, greedy, exactly 128 new tokens (EOS
ignored), prefix caching off, same threads; one worker process per engine (llama.cpp through
llama-cpp-python built from source, driven through its low-level batch API with one sequence
per prompt: n_parallel 16), one warm-up, then interleaved repetitions and medians, with the
load average before and after each sample. minivllm's workers: --quantization gguf-native-q8
(int8 inputs), gguf-native (fp32 inputs) and none (dense bf16, the pre-issue default).

Also recorded: each mode's weight bytes held by the model (packed linears + embedding) beside the
process RSS, at a small fixed --num-blocks; and the token agreement of the int8 path with the
fp32-input path (`agreement`: the int8 path's argmax at every position of the fp32 path's own
greedy continuations, teacher-forced), and whether gguf-native's greedy tokens equal the
dequantized (none, fp32) path's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench import cpu_paths, records

MODES = ("gguf-native-q8", "gguf-native", "none")
NUM_BLOCKS = 160  # 16 x (~40 + 128) tokens in blocks of 16, for every engine alike
NOTE = ("engines interleaved per repetition on a 2-core machine shared with other engineers' "
        "tests and benchmarks: each sample carries os.getloadavg() before and after it")


# ---- the workers: one engine each, work over a pipe ----------------------------------------------

def _minivllm_worker(mode: str, dtype: str, threads: int):
    import torch

    from minivllm import LLM, SamplingParams

    torch.set_num_threads(threads)
    llm = LLM(None, dtype=dtype, quantization=mode, num_blocks=NUM_BLOCKS,
              enable_prefix_caching=False, max_num_seqs=16)

    def generate(work: list) -> int:
        prompts = [{"prompt_token_ids": ids} for ids, _ in work]
        params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for _, n in work]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return generate, dict(mode=mode, dtype=dtype, **memory(llm))


def memory(llm) -> dict:
    """Bytes of weights the model holds (every parameter and buffer: the packed linears, the
    embedding if kept, norms, rotary tables) and the process's RSS."""
    model = llm.engine.runner.model
    held = sum(t.numel() * t.element_size()
               for t in [*model.parameters(), *model.buffers()])
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    return dict(weight_bytes=held, rss_bytes=rss)


def _llama_cpp_worker(threads: int):
    import llama_cpp as L
    import numpy as np

    from minivllm.loader import embedded_gguf_path

    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(embedded_gguf_path().encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_seq_max = NUM_BLOCKS * 16, 1024, 16
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(1024, 0, 16)

    def decode(items: list) -> list:
        """items: (token, pos, seq, wants logits); returns the argmax for those that want them."""
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, out
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i),
                                                    shape=(vocab,))))
                for i, it in enumerate(items) if it[3]]

    def generate(work: list) -> int:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        last, lens = [], []
        for seq, (ids, _) in enumerate(work):  # prefill, a prompt at a time
            last += decode([(t, p, seq, p == len(ids) - 1) for p, t in enumerate(ids)])
            lens.append(len(ids))
        done = len(work)
        for step in range(1, max(n for _, n in work)):
            live = [s for s, (_, n) in enumerate(work) if step < n]
            nxt = decode([(last[s], lens[s] + step - 1, s, True) for s in live])
            for s, t in zip(live, nxt):
                last[s] = t
            done += len(live)
        return done

    return generate, dict(version=L.__version__,
                          system_info=L.llama_print_system_info().decode().strip())


def worker(engine: str, mode: str, dtype: str, threads: int) -> None:
    generate, info = (_llama_cpp_worker(threads) if engine == "llama.cpp"
                      else _minivllm_worker(mode, dtype, threads))
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        work = json.loads(line)["work"]
        t = time.perf_counter()
        n = generate(work)
        print(json.dumps({"tok_s": n / (time.perf_counter() - t)}), flush=True)


class Worker(cpu_paths.Worker):
    """A worker process of this benchmark (measure, close: cpu_paths.Worker's)."""

    def __init__(self, engine: str, mode: str, dtype: str, threads: int, logs: str) -> None:
        self.engine, self.mode, self.dtype, self.threads = engine, mode, dtype, threads
        self.name = "llama.cpp" if engine == "llama.cpp" else f"minivllm {mode} {dtype}"
        self.log = open(os.path.join(logs, self.name.replace(" ", "_") + ".log"), "w")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.gguf_native", "worker", engine, mode, dtype,
             str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, env=env)
        self.info, self.samples = self._reply(), {}


# ---- parity: the int8 path's token agreement, gguf-native's greedy tokens -----------------------

def greedy(llm, work: list) -> list[list[int]]:
    from minivllm import SamplingParams

    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n) for _, n in work]
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in work], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def agreement(llm, work: list, reference: list[list[int]]) -> float:
    """The fraction of the reference's continuation tokens that `llm` also takes as its greedy
    choice, given the reference's own context before each (teacher-forced: one divergence does
    not carry into the next tokens)."""
    from minivllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": ids + ref} for (ids, _), ref in zip(work, reference)],
                        params, use_tqdm=False)
    same = total = 0
    for (ids, _), ref, out in zip(work, reference, outs):
        for pos, tok in enumerate(ref):
            # the position's top-1 (ties: the lowest id, as the greedy sampler takes)
            top = out.prompt_logprobs[len(ids) + pos]
            best = max(top.values())
            same += min(t for t, lp in top.items() if lp == best) == tok
            total += 1
    return same / total


def parity(work: list) -> dict:
    from minivllm import LLM

    kw = dict(dtype="float32", num_blocks=NUM_BLOCKS, enable_prefix_caching=False)
    runs, held = {}, {}
    for mode in ("none", "gguf-native"):
        llm = LLM(None, quantization=mode, **kw)
        runs[mode], held[mode] = greedy(llm, work), memory(llm)["weight_bytes"]
        del llm
    llm = LLM(None, quantization="gguf-native-q8", **kw)
    return dict(prompts=len(work), new_tokens=work[0][1], dtype="float32",
                gguf_native_equals_dequantized=runs["gguf-native"] == runs["none"],
                q8_agreement_with_fp32_inputs=agreement(llm, work, runs["gguf-native"]),
                weight_bytes_fp32_engine=held["none"], weight_bytes_gguf_native=held["gguf-native"],
                weight_bytes_ratio=held["gguf-native"] / held["none"])


# ---- the driver --------------------------------------------------------------------------------

def run(args) -> None:
    from bench.offline_throughput import chat_token_work

    work16 = chat_token_work(16, args.output_len)
    works = {b: work16[:b] for b in args.batches}
    os.makedirs(args.logs, exist_ok=True)
    checks = parity([(ids, 64) for ids, _ in work16]) if args.parity else None
    print("parity:", checks, flush=True)
    workers = [Worker("llama.cpp", "-", "-", args.threads, args.logs)]
    workers += [Worker("minivllm", m, args.dtype, args.threads, args.logs) for m in args.modes]
    try:
        for w in workers:
            for b in args.batches:
                w.measure(works[b])
        for rep in range(args.reps):
            for b in args.batches:
                for w in workers:
                    s = w.measure(works[b])
                    w.samples.setdefault(b, []).append(dict(s, rep=rep))
                    print(f"rep {rep} batch {b:2d} {w.name:<36} {s['tok_s']:8.1f} tok/s  "
                          f"load {s['loadavg_before'][0]:.2f}", flush=True)
            records.write(args.json, _records(workers, args, checks))
    finally:
        for w in workers:
            w.close()
    records.write(args.json, _records(workers, args, checks))


def _records(workers: list[Worker], args, checks) -> list[dict]:
    peer = {b: statistics.median(s["tok_s"] for s in workers[0].samples[b])
            for b in workers[0].samples}
    out = []
    for w in workers:
        for b, samples in w.samples.items():
            extra = {} if w.engine == "llama.cpp" else dict(
                weight_bytes=w.info["weight_bytes"], rss_bytes=w.info["rss_bytes"],
                num_blocks=NUM_BLOCKS)
            out.append(records.record(
                f"{w.name} batch {b}", statistics.median(s["tok_s"] for s in samples), "tok/s",
                peer=None if w.engine == "llama.cpp" else peer.get(b),
                peer_name=None if w.engine == "llama.cpp" else "llama.cpp", engine=w.engine,
                quantization=w.mode, dtype=w.dtype, batch=b, threads=args.threads,
                output_len=args.output_len, samples=samples, worker=w.info, parity=checks,
                note=NOTE, **extra))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    for name in ("engine", "mode", "dtype"):
        w.add_argument(name)
    w.add_argument("threads", type=int)
    r = sub.add_parser("run")
    r.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    r.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--output-len", type=int, default=128)
    r.add_argument("--parity", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--logs", default="/tmp/gguf_native_logs")
    r.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cmd == "worker":
        worker(args.engine, args.mode, args.dtype, args.threads)
    else:
        run(args)


if __name__ == "__main__":
    main()
