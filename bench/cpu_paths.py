"""minivllm's CPU kernel paths against vLLM-CPU and transformers, same weights, same prompts.

    python -m bench.cpu_paths hf-dir /tmp/smollm2-hf      # the peer's weights, checked
    python -m bench.cpu_paths run --hf-dir /tmp/smollm2-hf --vllm-python /tmp/venv-vllm/bin/python \
        --json bench/results/cpu_paths_cpu.json

The protocol of issue 19 (shared/notes/cpu-peers.md): 16 chat prompts (and the first alone),
greedy, exactly 128 new tokens (EOS ignored), prefix caching off; per engine and batch one
warm-up, then 3 x (prefill + 1 token) and 3 x 128 tokens, medians. One engine per process and
one dtype per process: every (engine, dtype, threads) is a worker process that loads once and
then runs what the driver asks over a pipe. Other work shares this CPU, so the driver
interleaves the workers per repetition (noise then hits them alike), keeps every worker but the
one measuring stopped (SIGSTOP: vLLM's idle workers spin), and records the load average before
and after every measurement.

Workers: minivllm's paths (`--kernels` cpu-avx512, cpu-avx2, cpu-portable; a path the CPU runs
only because it also has a better one is labelled "forced"), transformers `generate` in fp32,
and vLLM-CPU 0.32 in its own venv (`--vllm-python`), driven through its Python API on an HF
folder built from the embedded GGUF (`hf-dir`: dequantized with the `gguf` package,
attn_q/attn_k un-permuted, every tensor checked bit-identical with what minivllm loads).
vLLM-CPU loads its AVX-512 build on an AVX-512 CPU; the peer `vllm-avx2` ("vllm avx2-build
forced") makes it load its AVX2 build there (VLLM_AVX2_SITE below), the peer of minivllm's forced
AVX2 rows. Each minivllm row at the default dtype is compared with vLLM-CPU's build of the same
ISA (`peer`, `ratio`) and with the best vLLM-CPU row (`best_peer`, `best_ratio`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

from bench import records
from bench.server_proc import descendants

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # apt libtcmalloc-minimal4
MINIVLLM_PATHS = ("cpu-avx512", "cpu-avx2", "cpu-portable")
# KV cache of every engine: 16 x (~40 + 128) tokens need ~130 MiB in fp32; a dozen engines with
# the default 1-4 GiB each do not fit next to the other engineers' processes.
KV_CACHE_BYTES = 256 << 20


# ---- the peer's weights ------------------------------------------------------------------------

def build_hf_dir(out: str) -> None:
    """An HF folder (safetensors fp32, config.json, tokenizer) from the embedded GGUF, each tensor
    checked bit-identical with minivllm's loader."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    from bench.offline_throughput import hf_config
    from minivllm.loader import load_tokenizer, load_weights, resolve_model
    from minivllm.loader.gguf import hf_name

    source = resolve_model(None)
    arch = source.arch
    heads = {"attn_q": arch.num_attention_heads, "attn_k": arch.num_key_value_heads}
    tensors = {}
    for t in GGUFReader(source.path).tensors:
        w = dequantize(t.data, t.tensor_type)
        kind = t.name.split(".")[-2]
        if kind in heads:  # llama.cpp interleaves each head's rotary halves
            h, d = heads[kind], w.shape[0]
            w = w.reshape(h, d // h // 2, 2, -1).swapaxes(1, 2).reshape(d, -1)
        tensors[hf_name(t.name)] = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))
    ours = dict(load_weights(source, torch.float32, torch.device("cpu")))
    differ = [n for n in ours if not torch.equal(ours[n], tensors.get(n, torch.empty(0)))]
    if differ or set(ours) != set(tensors):
        raise SystemExit(f"not bit-identical with minivllm's weights: {differ[:5]}")
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(hf_config(arch), torch_dtype="float32"), f, indent=1)
    tok = load_tokenizer(source)
    tok.backend.save(os.path.join(out, "tokenizer.json"))
    names = tok.convert_ids_to_tokens([arch.bos_token_id, arch.eos_token_ids[0], 0])
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[0],
                   "eos_token": names[1], "unk_token": names[2], "pad_token": names[1],
                   "chat_template": tok.chat_template, "model_max_length": 8192}, f, indent=1)
    print(f"{out}: {len(tensors)} tensors, bit-identical with minivllm's loader")


# ---- workers: one engine, one dtype, one thread count each -------------------------------------

def _minivllm_worker(kernels: str, dtype: str, threads: int, hf_dir: str):
    import torch

    from bench.offline_throughput import run_minivllm
    from minivllm import LLM

    torch.set_num_threads(threads)
    llm = LLM(dtype=dtype, kernels=kernels, enable_prefix_caching=False, max_model_len=2048,
              cpu_kv_cache_bytes=KV_CACHE_BYTES)
    info = {"log_line": llm.engine.runner.kernels.describe()}
    return lambda work: run_minivllm(llm, work), info


def _hf_worker(kernels: str, dtype: str, threads: int, hf_dir: str):
    import torch
    import transformers

    from bench.offline_throughput import run_hf_static

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype)).eval()
    return lambda work: run_hf_static(model, work, len(work)), {}


# The forced AVX2 build of vLLM-CPU: sitecustomize runs in every Python process, and vLLM's engine
# core and model worker are fresh processes (spawned), so the patch reaches the one that imports
# the kernels (platforms/cpu.py `import_kernels` picks _C_AVX2 when AVX-512 is unsupported). The
# other AVX-512 branches read the same functions: the attention ISA (cpu_attn.py
# `_get_attn_isa`: "vec" either way without AMX), the AVX512-BF16 conv / GDN paths (unused by
# this model). Torch's own ops and the oneDNN matmuls under the AVX2 build dispatch on the CPU
# itself, so ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap them at AVX2, as on an AVX2 machine.
VLLM_AVX2_SITE = """import torch.cpu
for name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
             "_is_amx_tile_supported", "_is_amx_fp16_supported"):
    setattr(torch.cpu, name, lambda: False)
"""
VLLM_AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _vllm_libraries() -> list[str]:
    """The vLLM extension modules (_C*.so) mapped by this process and its descendants (the
    engine core's workers): which build the model worker loaded."""
    found = set()
    for pid in [os.getpid(), *descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/maps") as f:
                found |= {line.rsplit("/", 1)[1].strip() for line in f
                          if "/vllm/_C" in line}
        except OSError:
            pass
    return sorted(found)


def _vllm_worker(kernels: str, dtype: str, threads: int, hf_dir: str):
    from importlib import metadata

    import vllm

    llm = vllm.LLM(model=hf_dir, dtype=dtype, max_model_len=2048, enable_prefix_caching=False,
                   kv_cache_memory_bytes=KV_CACHE_BYTES)

    def run(work) -> float:
        params = [vllm.SamplingParams(temperature=0, max_tokens=o, min_tokens=o, ignore_eos=True)
                  for _, o in work]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in work], params,
                            use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert [len(o.outputs[0].token_ids) for o in outs] == [o for _, o in work]
        return sum(o for _, o in work) / elapsed

    import torch
    return run, {"versions": {"vllm-cpu": metadata.version("vllm-cpu"),
                              "torch": torch.__version__},
                 "vllm_C": _vllm_libraries(),
                 "env": {k: os.environ.get(k) for k in VLLM_AVX2_ENV}}


WORKERS: dict[str, Callable] = {"minivllm": _minivllm_worker, "transformers": _hf_worker,
                                "vllm": _vllm_worker}


def worker(engine: str, kernels: str, dtype: str, threads: int, hf_dir: str) -> None:
    """Loads, says ready (one JSON line), then answers each request line {"work": [[ids, n]...]}
    with {"tok_s": ...}. Replies go to the original stdout; everything else printed goes to
    stderr, so that engines' logs cannot garble the protocol."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    run, info = WORKERS[engine](kernels, dtype, threads, hf_dir)
    reply.write(json.dumps(dict(info, ready=True)) + "\n")
    for line in sys.stdin:
        work = [(ids, n) for ids, n in json.loads(line)["work"]]
        reply.write(json.dumps({"tok_s": run(work)}) + "\n")


# ---- the driver ----------------------------------------------------------------------------------

class Worker:
    """One worker process; `isa` is the instruction set its kernels run (None: torch's own)."""

    def __init__(self, engine: str, dtype: str, threads: int, args, kernels: str = "",
                 label: str = "", isa: Optional[str] = None) -> None:
        self.engine, self.dtype, self.threads, self.kernels = engine, dtype, threads, kernels
        self.isa = isa
        self.name = " ".join(filter(None, (engine, kernels, label, dtype, f"{threads}t")))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        python = sys.executable
        if engine == "vllm":
            python = args.vllm_python
            env.update(LD_PRELOAD=TCMALLOC,
                       VLLM_CPU_OMP_THREADS_BIND="0" if threads == 1 else f"0-{threads - 1}")
        if kernels == "avx2-build":
            site = os.path.join(args.logs, "vllm-avx2-site")
            os.makedirs(site, exist_ok=True)
            with open(os.path.join(site, "sitecustomize.py"), "w") as f:
                f.write(VLLM_AVX2_SITE)
            env.update(VLLM_AVX2_ENV, PYTHONPATH=os.pathsep.join(
                filter(None, (site, env.get("PYTHONPATH")))))
        cmd = [python, "-m", "bench.cpu_paths", "worker", engine, kernels or "-", dtype,
               str(threads), args.hf_dir]
        self.log = open(os.path.join(args.logs, self.name.replace(" ", "_") + ".log"), "w")
        for attempt in range(3):  # a start can fail for memory other processes hold just then
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.log, text=True, env=env)
            line = self.proc.stdout.readline()
            if line:
                break
            self.proc.wait()
            print(f"worker {self.name} failed to start (see {self.log.name}), retrying")
            time.sleep(60)
        self.info = json.loads(line) if line else self._reply()
        self.samples: dict[tuple[int, int], list[dict]] = {}
        self.pause(True)

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died; see {self.log.name}")
        return json.loads(line)

    def measure(self, work) -> dict:
        """tok/s of `work`, the other workers' processes stopped meanwhile (pause)."""
        self.pause(False)
        before = os.getloadavg()
        self.proc.stdin.write(json.dumps({"work": work}) + "\n")
        self.proc.stdin.flush()
        tok_s = self._reply()["tok_s"]
        after = os.getloadavg()
        self.pause(True)
        return {"tok_s": tok_s, "loadavg_before": before, "loadavg_after": after}

    def pause(self, stop: bool) -> None:
        """SIGSTOP (or SIGCONT) the worker and its descendants: an idle vLLM worker process
        spins on its shared-memory queue at ~45% of a core, which the engine measured next
        would otherwise share the machine with."""
        for pid in [self.proc.pid] + descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGSTOP if stop else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.pause(False)
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


def _start_workers(args, threads: int, out: list[Worker]) -> None:
    """Starts this thread count's workers one after the other, appending each to `out`."""
    from minivllm._cext import cpu_kernels

    best = next(isa for isa in cpu_kernels.ISAS if cpu_kernels.missing(isa) is None)
    for kernels in args.paths:
        isa = kernels.removeprefix("cpu-")
        if cpu_kernels.missing(isa) is not None:
            print(f"{kernels}: not measured, this CPU lacks it ({cpu_kernels.missing(isa)})")
            continue
        forced = "forced" if cpu_kernels.ISAS.index(isa) > cpu_kernels.ISAS.index(best) \
            and isa != "portable" else ""
        for d in args.dtypes:
            out.append(Worker("minivllm", d, threads, args, kernels, forced, isa=isa))
    if "transformers" in args.peers:
        out.append(Worker("transformers", "float32", threads, args))
    # vLLM-CPU loads its AVX-512 build where the CPU has AVX-512, else its AVX2 build
    vllm_isa = "avx512" if best == "avx512" else "avx2"
    for d in args.dtypes if "vllm" in args.peers else ():
        out.append(Worker("vllm", d, threads, args, isa=vllm_isa))
    if "vllm-avx2" in args.peers and vllm_isa == "avx2":
        print("vllm-avx2: not measured, vllm already runs its AVX2 build on this CPU")
    elif "vllm-avx2" in args.peers:
        for d in args.dtypes:
            out.append(Worker("vllm", d, threads, args, "avx2-build", "forced", isa="avx2"))


def run(args) -> None:
    from bench.offline_throughput import chat_token_work

    work16 = chat_token_work(16, args.output_len)
    works = {b: work16[:b] for b in args.batches}
    os.makedirs(args.logs, exist_ok=True)
    results = []
    for threads in args.threads:
        workers: list[Worker] = []
        try:
            _start_workers(args, threads, workers)
            for w in workers:  # warm-up: one whole run per batch size
                for b in args.batches:
                    w.measure(works[b])
            for rep in range(args.reps):
                for b in args.batches:
                    for w in workers:
                        prefill = w.measure([(ids, 1) for ids, _ in works[b]])
                        full = w.measure(works[b])
                        w.samples.setdefault((b, threads), []).append(
                            dict(full, prefill_s=b / prefill["tok_s"], rep=rep))
                        print(f"rep {rep} batch {b:2d} {w.name:<40} {full['tok_s']:8.1f} tok/s"
                              f"  load {full['loadavg_before'][0]:.2f}", flush=True)
                # what is measured so far, should the run be cut short
                records.write(args.json, results + _records(workers, args))
        finally:
            for w in workers:
                w.close()
        results += _records(workers, args)
    records.write(args.json, results)


NOTE = ("engines interleaved per repetition on a 2-core machine shared with other engineers' "
        "tests and benchmarks: each sample carries os.getloadavg() before and after it")


def _records(workers: list[Worker], args) -> list[dict]:
    """One record per worker and batch (median tok/s). minivllm's at its default dtype on the
    CPU paths (bf16) carry the ratio to vLLM-CPU's best dtype in the build of the same ISA
    (`peer`; none for the portable path) and to the best vLLM-CPU row of all (`best_peer`), at
    the same batch and threads."""
    from minivllm.layers.kernels import CPU_AUTO_DTYPE

    default = str(CPU_AUTO_DTYPE).removeprefix("torch.")
    medians = {(w.name, key): statistics.median(s["tok_s"] for s in samples)
               for w in workers for key, samples in w.samples.items()}

    def best_of(peers: list[Worker], key) -> tuple:
        got = [(medians[v.name, key], v.name) for v in peers if key in v.samples]
        return max(got) if got else (None, None)

    out = []
    vllms = [v for v in workers if v.engine == "vllm"]
    for w in workers:
        for (b, threads), samples in w.samples.items():
            key, compared = (b, threads), w.engine == "minivllm" and w.dtype == default
            same = best_of([v for v in vllms if v.isa == w.isa], key) if compared else (None,)*2
            best = best_of(vllms, key) if compared else (None, None)
            extra = dict(best_peer=best[0], best_peer_name=best[1],
                         best_ratio=medians[w.name, key] / best[0]) if best[0] else {}
            out.append(records.record(
                f"{w.name} batch {b}", medians[w.name, key], "tok/s", peer=same[0],
                peer_name=same[1], **extra, isa=w.isa,
                engine=w.engine, kernels=w.kernels or None, dtype=w.dtype,
                default_dtype=w.engine == "minivllm" and w.dtype == default, batch=b,
                threads=threads, output_len=args.output_len,
                prefill_plus_1_s=statistics.median(s["prefill_s"] for s in samples),
                samples=samples, worker=w.info, note=NOTE))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hf-dir").add_argument("out")
    w = sub.add_parser("worker")
    for name in ("engine", "kernels", "dtype"):
        w.add_argument(name)
    w.add_argument("threads", type=int)
    w.add_argument("hf_dir")
    r = sub.add_parser("run")
    r.add_argument("--hf-dir", required=True)
    r.add_argument("--vllm-python", default="/tmp/venv-vllm/bin/python")
    r.add_argument("--paths", nargs="+", default=list(MINIVLLM_PATHS), choices=MINIVLLM_PATHS)
    r.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    r.add_argument("--peers", nargs="*", default=["transformers", "vllm", "vllm-avx2"],
                   choices=["transformers", "vllm", "vllm-avx2"])
    r.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    r.add_argument("--batches", nargs="+", type=int, default=[16, 1])
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--output-len", type=int, default=128)
    r.add_argument("--logs", default="/tmp/cpu_paths_logs")
    r.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cmd == "hf-dir":
        build_hf_dir(args.out)
    elif args.cmd == "worker":
        worker(args.engine, args.kernels, args.dtype, args.threads, args.hf_dir)
    else:
        run(args)


if __name__ == "__main__":
    main()
