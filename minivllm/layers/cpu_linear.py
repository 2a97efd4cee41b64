"""Linear layers on CPU through our own kernels (csrc/cpu_kernels_body.h, `linear`).

Weights are repacked once into 16-column panels that each thread streams sequentially with a
software prefetch ahead, all of them in one buffer backed by huge pages; one layout for every
ISA (`CpuKernels`). Measured on the 2-core dev machine with AVX-512, SmolLM2-135M's 30 layers
of linears (cold weights), what ran before -> ours:

    rows M               1              16             64            640
    fp32 (oneDNN)   21.5 -> 13.3   36.8 -> 21.0   85.4 -> 64.8   656 -> 617 ms
    bf16 (F.linear) 15.1 ->  6.9   22.2 -> 10.5   47.4 -> 33.2   343 -> 317 ms

At M = 1 weights stream at 30-50 GB/s (it varies with the host's other tenants); at M = 16
fp32 runs at ~170 GFLOPS of a ~190 hot-cache peak.

A GGUF model's linears may stay in the file's quantization blocks (`quantized_modules`,
`--quantization gguf-native`): the kernels dequantize them in registers, so a step reads the
file's 4.5-8.5 bits a weight (6 for Q4_K) instead of 16 or 32.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from minivllm._cext import cpu_kernels

logger = logging.getLogger(__name__)

# A weight as the kernels take it: dense [N, K], or (ggml type, the file's blocks [N, bytes]).
Weight = Union[torch.Tensor, tuple[int, np.ndarray]]


class CpuLinear(nn.Module):
    """y = x W^T + b for x [M, in_features], from a packed weight (`pack_weights`), on one
    ISA's kernels. `out_dtype` float32 lets a bf16 layer write fp32 (the LM head's logits).
    `qtype`: the weight's ggml quantization type, 0 for dense; `act_q8`: a quantized weight
    multiplies int8-quantized inputs (the int8 path)."""

    def __init__(self, packed: torch.Tensor, out_features: int, bias: Optional[torch.Tensor],
                 kernels: cpu_kernels.CpuKernels, out_dtype: Optional[torch.dtype] = None,
                 qtype: int = 0, act_q8: bool = False) -> None:
        super().__init__()
        self.out_features, self.out_dtype, self.kernels = out_features, out_dtype, kernels
        self.qtype, self.act_q8 = qtype, act_q8 and qtype != 0
        self.register_buffer("packed", packed, persistent=False)
        # The kernel adds the bias in fp32 before its one rounding of the output.
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.packed, self.out_features, self.bias, self.out_dtype,
                                   qtype=self.qtype, act_q8=self.act_q8)


def _layout(w: Weight) -> tuple[tuple, torch.dtype]:
    if isinstance(w, torch.Tensor):
        return cpu_kernels.packed_shape(w), w.dtype
    qtype, blocks = w
    k = cpu_kernels.quant_in_features(qtype, blocks.shape[1])
    return cpu_kernels.quant_packed_shape(qtype, blocks.shape[0], k), torch.uint8


def pack_weights(weights: Sequence[Weight]) -> list[torch.Tensor]:
    """The kernel's layout of each weight, all in one huge-page buffer, in order."""
    layouts = [_layout(w) for w in weights]
    sizes = [torch.Size(s).numel() * dt.itemsize for s, dt in layouts]
    arena = cpu_kernels.empty_huge_pages(sum(sizes))
    packed, offset = [], 0
    for w, (shape, dtype), size in zip(weights, layouts, sizes):
        out = arena[offset:offset + size].view(dtype).view(shape)
        if isinstance(w, torch.Tensor):
            packed.append(cpu_kernels.pack_linear_weight(w, out))
        else:
            qtype, blocks = w
            packed.append(cpu_kernels.pack_quant_weight(qtype, blocks,
                                                        shape[1] * cpu_kernels.BLOCK, out))
        offset += size
    return packed


def quantized_modules(model: nn.Module, blocks: Iterable[tuple[str, int, np.ndarray]],
                      strict: bool) -> dict[str, tuple[int, np.ndarray]]:
    """The GGUF blocks (loader.gguf.load_blocks) of each linear of `model` that the kernels run
    quantized, by module name ("lm_head" for the head, tied or not), a fused module's shards
    stacked in order. A linear whose type the kernels do not run stays dense, with a log line
    naming it, or with `strict` (gguf-native asked for) is a ValueError. Float tensors (F32,
    F16, BF16) stay dense: they are no quantization."""
    tied = model.arch.tie_word_embeddings
    modules = dict(model.named_modules())
    parts: dict[str, dict[int, tuple[str, int, np.ndarray]]] = {}
    for hf, qtype, raw in blocks:
        name, shard = hf.removeprefix("model.").removesuffix(".weight"), 0
        if name == "embed_tokens":
            if not tied:
                continue
            name = "lm_head"
        for part, (fused, shard_id) in model.packed_modules_mapping.items():
            if name.endswith(f".{part}"):
                name, shard = f"{name[:-len(part)]}{fused}", shard_id
                break
        parts.setdefault(name, {})[shard] = (hf, qtype, raw)
    runs = set(cpu_kernels.QUANT_TYPES.values())
    dense = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    out = {}
    for name, shards in parts.items():
        tensors = [shards[i] for i in sorted(shards)]
        types = [GGMLQuantizationType(qtype) for _, qtype, _ in tensors]
        if all(t in dense for t in types):
            continue
        module = modules.get(name)
        features = (model.arch.vocab_size if name == "lm_head" else module.out_features)
        rows = sum(raw.shape[0] for _, _, raw in tensors)
        if any(t not in runs for t in types) or len(set(types)) > 1:
            why = (f"GGUF tensor(s) {', '.join(hf for hf, _, _ in tensors)} of type(s) "
                   f"{', '.join(t.name for t in types)}: the CPU kernels run "
                   f"{', '.join(cpu_kernels.QUANT_TYPES)}, one type per linear")
        elif rows != features:
            why = (f"{name}: this model's rank holds {features} of its {rows} rows (tensor "
                   f"parallel): quantized linears run whole")
        else:
            out[name] = (int(types[0]), np.concatenate([raw for _, _, raw in tensors])
                         if len(tensors) > 1 else tensors[0][2])
            continue
        if strict:
            raise ValueError(f"quantization gguf-native: {why}; use --quantization none")
        logger.info("quantization: %s: %s dequantized", why, name)
    return out


def quantization_mode(quantization: str, source_kind: str,
                      kernels: Optional[cpu_kernels.CpuKernels], dtype: torch.dtype) -> str:
    """What runs a model's linears (config.ModelConfig.quantization), logged in one line: none
    (dense), gguf-native (the GGUF blocks, fp32 inputs) or gguf-native-q8 (the blocks times
    int8 inputs); a ValueError where a gguf-native mode was asked for and cannot run. auto
    takes the fastest path whose greedy text is the dense weights' (AUTO_MEASURED): the int8
    path is opt-in, since its 96.8 % token agreement still changes answers (the embedded
    model's chat answer to the capital of France lost 'Paris')."""
    native = quantization.startswith("gguf-native")
    if quantization == "none" or source_kind != "gguf":
        if native:
            raise ValueError(f"quantization {quantization} needs a GGUF model, not {source_kind}")
        return "none"
    if kernels is None:
        if native:
            raise ValueError(f"quantization {quantization} needs the CPU kernels (kernels cpu-*)")
        return "none"
    if quantization == "gguf-native-q8" and not kernels.int8_dot:
        raise ValueError(f"quantization gguf-native-q8 needs AVX-512 kernels on a CPU with "
                         f"AVX512-VNNI, not {kernels.isa} here")
    mode = quantization
    if quantization == "auto" and dtype == torch.float32:
        # float32 asks for parity with float32 references: fp32 inputs, or dense weights
        mode = "none" if kernels.isa == "portable" else "gguf-native"
    elif quantization == "auto":
        mode = "none"
    logger.info("quantization: %s (%s)", mode, f"auto: {AUTO_MEASURED[mode]}"
                if quantization == "auto" else "asked for")
    return mode


# Why auto takes each mode (bench/gguf_native.py, results in bench/results/gguf_native_cpu.json).
AUTO_MEASURED = {
    "gguf-native": "float32: fp32 inputs, greedy tokens equal to those of the dequantized "
                   "weights; 30 layers of linears at 1 / 16 rows against dense fp32: AVX-512 "
                   "4.9 / 56 ms against 20 / 51, AVX2 8.3 / 59 against 18 / 68",
    "none": "dense weights are the fastest with parity here: bf16 (1 thread, embedded model, "
            "65 / 283 tok/s at batch 1 / 16 against 59 / 152 for GGUF blocks with fp32 inputs; "
            "the faster int8 path, --quantization gguf-native-q8, is opt-in), or the portable "
            "path (38 / 425 ms against 24 / 230 dense fp32)",
}


def use_cpu_linears(model: nn.Module, kernels: cpu_kernels.CpuKernels,
                    head: Optional[tuple] = None,
                    quantized: Optional[dict[str, tuple[int, np.ndarray]]] = None,
                    act_q8: bool = False) -> None:
    """Replace every nn.Linear under `model` in place by a CpuLinear on `kernels` (their unpacked
    weights are dropped). `head` = (weight, bias) becomes `model.lm_head`, writing fp32 logits.
    `quantized` (quantized_modules) gives the modules that keep their GGUF blocks (on the int8
    path with `act_q8`); a tied
    embedding whose head is quantized is dropped too: the C decoder looks its rows up in the
    head (cpu_decoder.py)."""
    quantized = quantized or {}
    q6 = [name for name, (qtype, _) in quantized.items()
          if qtype == cpu_kernels.QUANT_TYPES["Q6_K"]]
    if act_q8 and q6:
        logger.info("quantization: %d Q6_K linear(s) (e.g. %s) take fp32 inputs: the int8 path "
                    "runs one scale a block", len(q6), q6[0])
    sites = list(_linears(model))
    specs = [(quantized.get(path, child.weight), child.weight.shape[0], child.bias, None)
             for path, _, _, child in sites]
    if head is not None:
        specs.append((quantized.get("lm_head", head[0]), head[0].shape[0], head[1],
                      torch.float32))
    packed = pack_weights([w for w, _, _, _ in specs])
    layers = [CpuLinear(p, n, b, kernels, dt, 0 if isinstance(w, torch.Tensor) else w[0], act_q8)
              for p, (w, n, b, dt) in zip(packed, specs)]
    for (_, parent, name, _), layer in zip(sites, layers):
        setattr(parent, name, layer)
    if head is not None:
        model.lm_head = layers[-1]
        if "lm_head" in quantized and head[0] is model.embed_tokens.weight:
            model.embed_tokens.weight.data = torch.empty(0, dtype=head[0].dtype)


def _linears(module: nn.Module, prefix: str = ""):
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            yield f"{prefix}{name}", module, name, child
        else:
            yield from _linears(child, f"{prefix}{name}.")
