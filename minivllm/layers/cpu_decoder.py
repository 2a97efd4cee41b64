"""The model's forward on CPU as one C call a step: what CUDA graphs are to the GPU path.

`CpuDecoder` takes a LlamaForCausalLM (Llama, Qwen2) whose linears were packed for one ISA's
kernels (cpu_linear.py) and whose KV caches are bound, and runs its decoder stack through
`cpu_kernels.CpuDecoder`: embedding, 30 layers of norm / qkv / rotary / paged attention / o /
norm / gate-up / SiLU / down, and the final norm in one OpenMP parallel region whose only
synchronisation is the kernels' own barriers, on activations allocated once. The module graph
stays the specification (tests/test_cpu_kernels.py holds the two to the same outputs); this
replaces the ~300 Python calls, tensor allocations and parallel regions it costs per step.
Logits come from the packed LM head into a buffer reused every step. Linears packed quantized
(cpu_linear.quantized_modules) run so inside the C call too, and a tied embedding whose head is
quantized is looked up in the head's blocks.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from minivllm._cext import cpu_kernels
from minivllm.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


class ThreadChoice:
    """The thread count of each step: all the configured threads, or one where one is faster.

    A step of the decoder crosses ~350 barriers (each kernel's worksharing loop ends in one),
    and on a CPU shared with other busy processes each barrier waits until the OS runs every
    thread of the team again: measured at 2 threads on 2 cores at load 7, one decode ran at
    4-15 tok/s against 47-50 on one thread (at load 10-13, 0.8-3 s a step against 14-50 ms).
    So for each size of step (token counts by powers of two) both counts are timed, the
    faster one runs, and the other is timed again after 16 of its steps' worth of time, then
    after twice as many each time it loses again (up to 64), back to 16 when the choice flips:
    a probe of the slower count costs at most 1/17 of the time, soon 1/65, and a change of
    load is followed within 65 of the slower count's steps."""

    PROBE_MIN, PROBE_MAX, ALPHA = 16, 64, 0.3

    def __init__(self, threads: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.threads, self.clock = threads, clock
        self.buckets: dict[int, dict] = {}
        self.current = threads

    def choose(self, tokens: int) -> int:
        """The thread count to run a step of `tokens` on (then report it by `done`)."""
        if self.threads == 1:
            return 1
        b = self.buckets.setdefault(tokens.bit_length(), {
            "tokens": tokens, "time": {}, "best": self.threads, "wait": 0,
            "interval": self.PROBE_MIN})
        missing = [n for n in (self.threads, 1) if n not in b["time"]]
        if missing:
            n = missing[0]
        elif b["wait"] <= 0:
            n = 1 if b["best"] != 1 else self.threads
        else:
            n = b["best"]
        self._set(n)
        self._bucket, self._start = b, self.clock()
        return n

    def done(self) -> None:
        """Ends the step begun by the last `choose`, and gives the process its configured
        count back: torch's thread count is the whole process's (an LLM() in someone's
        program, the logits, the sampler)."""
        if self.threads == 1:
            return
        b, n, dt = self._bucket, self.current, self.clock() - self._start
        self._set(self.threads)
        old = b["time"].get(n)
        # a probe's time replaces its count's, which is stale; the running count's is smoothed
        b["time"][n] = dt if old is None or n != b["best"] else old + self.ALPHA * (dt - old)
        if len(b["time"]) < 2:
            return
        best = min(b["time"], key=b["time"].get)
        if n != b["best"]:  # a probe (or the first timing of this count)
            b["interval"] = self.PROBE_MIN if best != b["best"] else \
                min(2 * b["interval"], self.PROBE_MAX)
            # in steps of the faster count: a probe costs at most 1 / interval of the time
            slower = max(b["time"].values()) / b["time"][best]
            b["wait"] = int(b["interval"] * slower)
        else:
            b["wait"] -= 1
        if best != b["best"]:
            logger.info("CPU decoder: steps of ~%d tokens run on %d thread%s now (%.1f ms a "
                        "step against %.1f on %d)", b["tokens"], best,
                        "s" if best > 1 else "", 1e3 * b["time"][best],
                        1e3 * b["time"][b["best"]], b["best"])
            b["best"] = best

    def _set(self, n: int) -> None:
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n


class CpuDecoder:
    def __init__(self, model: torch.nn.Module, kernels: cpu_kernels.CpuKernels,
                 max_num_seqs: int) -> None:
        arch, layers = model.arch, model.layers
        rotary = layers[0].self_attn.rotary

        def tensors(layer) -> dict:
            attn, mlp = layer.self_attn, layer.mlp
            return dict(in_norm=layer.input_layernorm.weight.data,
                        post_norm=layer.post_attention_layernorm.weight.data,
                        qkv=attn.qkv_proj.packed, qkv_bias=attn.qkv_proj.bias,
                        o=attn.o_proj.packed, gate_up=mlp.gate_up_proj.packed,
                        down=mlp.down_proj.packed, k_cache=attn.k_cache, v_cache=attn.v_cache,
                        types=dict(qkv=attn.qkv_proj.qtype, o=attn.o_proj.qtype,
                                   gate_up=mlp.gate_up_proj.qtype, down=mlp.down_proj.qtype))

        self.head = head = model.lm_head
        # An empty embedding: the tied embedding was dropped for its quantized head.
        embed, embed_type = ((head.packed, head.qtype) if model.embed_tokens.weight.numel() == 0
                             else (model.embed_tokens.weight.data, 0))
        self.decoder = cpu_kernels.CpuDecoder(
            kernels, embed, model.norm.weight.data, rotary.cos, rotary.sin,
            [tensors(layer) for layer in layers], arch.num_attention_heads,
            arch.num_key_value_heads, arch.rms_norm_eps, embed_type, arch.vocab_size,
            head.act_q8)
        self.logits = torch.empty(max_num_seqs, arch.vocab_size, dtype=torch.float32)
        self.threads = ThreadChoice(torch.get_num_threads())

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """[T] token ids and positions -> [T, hidden] final hidden states (until the next call);
        `meta.prepared` is the step's AttentionPlan (CpuAttentionBackend.prepare). Runs on the
        thread count `self.threads` chose for a step of its size."""
        self.threads.choose(input_ids.shape[0])
        hidden = self.decoder.forward(input_ids, positions, meta.prepared)
        self.threads.done()
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab], in a buffer the next step overwrites."""
        head = self.head
        return head.kernels.linear(hidden.contiguous(), head.packed, head.out_features,
                                   head.bias, torch.float32, self.logits[:hidden.shape[0]],
                                   qtype=head.qtype, act_q8=head.act_q8)
