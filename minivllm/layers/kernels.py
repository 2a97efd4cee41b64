"""The kernel set: which kernels run the model, chosen once per engine (`ModelConfig.kernels`).

A set is an attention backend, the fused elementwise kernels the RMSNorm, rotary and SiLU-and-mul
layers call instead of their torch ops, and the CPU kernels the linears move onto, if any. The
model runner selects it from the device, dtype and CPU features, passes it to the model's
constructor, and logs it in one line (`describe()`). `auto` takes the first set of the device's
that runs here (on a CPU: AVX-512, then AVX2, then the portable C kernels), else plain torch,
and says why; a set asked for by name that cannot run here is a ValueError naming what it
needs. A new path is one entry in `_PATHS`, its name being in `config.KERNEL_SETS`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from minivllm._cext import cpu_kernels
from minivllm.config import ArchConfig, ModelConfig, resolve_dtype
from minivllm.layers.attention import AttentionBackend, TorchAttentionBackend
from minivllm.layers.cpu_attention import SUPPORTED_HEAD_DIMS, CpuAttentionBackend


class FusedOps(NamedTuple):
    """Fused kernels a layer calls instead of its torch ops (the layers' forward_native)."""

    rms_norm: Callable  # (x, residual, weight, eps) -> out; residual += x in place
    rotary_: Callable  # (positions, cos, sin, q, k): rotates q and k in place
    silu_and_mul: Callable  # [T, 2F] (gate | up) -> [T, F]


@dataclass(frozen=True)
class KernelSet:
    name: str  # one of config.KERNEL_SETS
    device: torch.device
    dtype: torch.dtype
    attention: AttentionBackend
    fused: Optional[FusedOps] = None  # None: the layers' torch ops
    # The kernels nn.Linear layers move onto (CpuLinear) once the weights are loaded; None: torch.
    cpu_linears: Optional[cpu_kernels.CpuKernels] = None
    # The sampler's argmax over fp32 logit rows (the CPU kernels' LM head writes fp32); None:
    # torch's.
    argmax: Optional[Callable] = None
    # Grammar masks applied in place to fp32 logit rows on the CPU, (logits, bitmask, rows);
    # None: xgrammar's kernel (engine/structured_output.py).
    mask_rows: Optional[Callable] = None
    cuda_graphs: bool = False  # steps replay CUDA graphs (engine/cuda_graphs.py)
    note: str = ""  # what the log line must add: why auto fell back, what runs in torch

    def describe(self) -> str:
        """The startup log line, e.g. `kernels: cpu-avx512 float32, 2 threads`."""
        dtype = str(self.dtype).removeprefix("torch.")
        how = (("cuda graphs" if self.cuda_graphs else "eager") if self.device.type == "cuda"
               else f"{torch.get_num_threads()} threads")
        return f"kernels: {self.name} {dtype}, {how}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class _Path:
    auto_on: Optional[str]  # the device type where `auto` tries this path (in _PATHS order)
    # What the path needs and this machine, device, dtype or head_dim lacks; None: it runs.
    missing: Callable[[torch.device, torch.dtype, int], Optional[str]]
    build: Callable[[torch.dtype], dict]  # KernelSet fields beyond name, device and dtype


def _cpu_missing(isa: str) -> Callable[[torch.device, torch.dtype, int], Optional[str]]:
    def missing(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        if device.type != "cpu":
            return f"a CPU device, not {device.type}"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"float32 or bfloat16, not {str(dtype).removeprefix('torch.')}"
        if head_dim not in SUPPORTED_HEAD_DIMS:
            return f"head_dim in {SUPPORTED_HEAD_DIMS}; this model has {head_dim}"
        return cpu_kernels.missing(isa)
    return missing


def cpu_fused(kernels: cpu_kernels.CpuKernels) -> FusedOps:
    return FusedOps(kernels.rms_norm_, kernels.rotary_, kernels.silu_and_mul)


def _cpu(isa: str) -> Callable[[torch.dtype], dict]:
    def build(dtype: torch.dtype) -> dict:
        k = cpu_kernels.CpuKernels(isa)
        # AVX-512 without AVX512-BF16 widens bf16 weights in registers like AVX2: say so.
        slow_bf16 = dtype == torch.bfloat16 and isa == "avx512" and not k.bf16_dot
        # The portable argmax stays torch's: compiled for baseline x86-64 its vectors go
        # through the stack (16 x 49152: 2.1 ms, torch 0.65, AVX2 0.05).
        return dict(attention=CpuAttentionBackend(k), cpu_linears=k, fused=cpu_fused(k),
                    argmax=None if isa == "portable" else k.argmax, mask_rows=k.mask_rows_,
                    note="bf16 linears without AVX512-BF16: widened to fp32 in registers"
                    if slow_bf16 else "")
    return build


def _triton_missing(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "a CUDA device (on CPU only under TRITON_INTERPRET=1, for tests)"
    # The attention kernels tile the head dimension whole, and tl.dot wants 16 at least.
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"a power-of-two head_dim >= 16; this model has {head_dim}"
    return None


def _triton(dtype: torch.dtype) -> dict:
    # Imported only when chosen: importing triton costs CPU-only processes time, and Triton
    # reads its interpreter switch (TRITON_INTERPRET, used by tests) when kernels are defined.
    fused = importlib.import_module("minivllm.layers.triton_fused")
    attention = importlib.import_module("minivllm.layers.triton_attention")
    return dict(attention=attention.TritonAttentionBackend(),
                fused=FusedOps(fused.rms_norm, fused.rotary_, fused.silu_and_mul))


_PATHS = {
    "cuda-triton": _Path("cuda", _triton_missing, _triton),
    "cpu-avx512": _Path("cpu", _cpu_missing("avx512"), _cpu("avx512")),
    "cpu-avx2": _Path("cpu", _cpu_missing("avx2"), _cpu("avx2")),
    "cpu-portable": _Path("cpu", _cpu_missing("portable"), _cpu("portable")),
    "torch": _Path(None, lambda device, dtype, head_dim: None,
                   lambda dtype: dict(attention=TorchAttentionBackend())),
}


# dtype="auto" on a CPU path, for a float32 (or float16) checkpoint: bf16 weights halve the
# memory traffic and the kernels compute in fp32 either way. One step of the embedded model, 1
# thread, batch 16 / batch 1, fp32 -> bf16 (ms): AVX-512 48 / 17 -> 27 / 9.4 (vdpbf16ps), AVX2
# 66 / 19 -> 60 / 11, portable 216 / 22 -> 215 / 21.
CPU_AUTO_DTYPE = torch.bfloat16


def select_kernels(config: ModelConfig, device: torch.device, arch: ArchConfig) -> KernelSet:
    """The kernel set `config.kernels` names, or for `auto` the first of the device's that runs
    here (plain torch when none does, with the reason in its note), and its dtype: the one asked
    for, else the checkpoint's, except that a CPU path takes CPU_AUTO_DTYPE, its fastest. A CPU
    path that its CPU lacks is no fallback: auto's choice is then the CPU's best, named in the
    log line."""
    dtype, note = resolve_dtype(config.dtype, arch, device), ""
    if config.kernels == "auto":
        tried = [(name, path.missing(device, dtype, arch.head_dim))
                 for name, path in _PATHS.items() if path.auto_on == device.type]
        name = next((name for name, why in tried if why is None), "torch")
        if tried and name == "torch":  # say why the device's first choice did not run
            note = f"{tried[0][0]} kernels need {tried[0][1]}: running plain torch"
    else:
        name = config.kernels
        why = _PATHS[name].missing(device, dtype, arch.head_dim)
        if why is not None:
            raise ValueError(f"kernels={name!r} cannot run here: it needs {why}")
    if config.dtype == "auto" and _PATHS[name].auto_on == "cpu" and dtype != CPU_AUTO_DTYPE:
        dtype = CPU_AUTO_DTYPE
        note = f"dtype auto: {str(dtype).removeprefix('torch.')}, the fastest on these kernels"
    fields = _PATHS[name].build(dtype)
    note = "; ".join(filter(None, (note, fields.pop("note", ""))))
    graphs = (device.type == "cuda" and fields["attention"].cuda_graph_safe
              and not config.enforce_eager)
    return KernelSet(name, device, dtype, cuda_graphs=graphs, note=note, **fields)
