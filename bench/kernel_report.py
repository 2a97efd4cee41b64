"""The attention kernels compiled for a GPU this machine need not have: what the compiler made.

For each model shape, the Triton attention kernels are compiled as the engine launches them
(TritonAttentionBackend's parameters, the JIT's argument specialization) for the target
architecture with the ptxas that Triton bundles, and cuobjdump reports what decides their
speed before any device time is spent: registers a thread, spilled bytes (stack) and the
local-memory loads and stores they cost, shared memory, how wide the global loads are, the
asynchronous copies, and which tensor-core instruction the products became (HMMA: Ampere's
warp-level mma; HGMMA: Hopper's warpgroup wgmma). Run it before a GPU call that changes a kernel.

    python -m bench.kernel_report [--target cuda:90] [--json bench/results/kernel_report_sm90.json]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget

from bench.records import record, write
from minivllm.config import CacheConfig
from minivllm.layers import triton_attention as ta
from minivllm.loader.dummy import preset

# The SASS instructions worth counting, by the family their name starts with.
_OPS = re.compile(r"\b(LDG\.E[.\w]*|LDGSTS[.\w]*|STG\.E[.\w]*|LDL[.\w]*|STL[.\w]*|HGMMA[.\w]*|"
                  r"HMMA[.\w]*|MUFU\.EX2|BAR\.SYNC[.\w]*)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.int64: "i64", torch.int32: "i32"}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def signature(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for `fn` called with `args`, specialized as the JIT does
    for a launch: pointers (given as their torch dtype) and ints divisible by 16 carry that
    hint, an int equal to 1 becomes a constant, names in do_not_specialize take neither."""
    sig, consts, attrs = {}, {}, {}
    fixed = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.dtype):
            sig[name], attrs[(i,)] = "*" + _TRITON_TYPES[value], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1 and name not in fixed:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if value % 16 == 0 and name not in fixed:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def local_ops_in_inner_loops(sass: str) -> int:
    """Local-memory loads and stores (spills) inside innermost loops, the ones that cost: a
    loop is a backward branch's span, innermost when it holds no other."""
    code = [(int(a, 16), text) for a, text in _INSTRUCTION.findall(sass)]
    loops = [(int(m.group(1), 16), a) for a, text in code
             if (m := re.search(r"BRA (0x[0-9a-f]+)", text)) and int(m.group(1), 16) < a]
    inner = [(lo, hi) for lo, hi in loops
             if not any(lo <= x and y <= hi and (x, y) != (lo, hi) for x, y in loops)]
    return sum(1 for a, text in code if re.match(r"(LDL|STL)\b", text)
               and any(lo <= a <= hi for lo, hi in inner))


def compile_report(fn, args: dict, target: GPUTarget) -> dict:
    """Compile `fn` for `target` with `args` (constexprs, num_warps, num_stages included) and
    read back the cubin's resource usage and instruction counts."""
    args = dict(args)
    options = {"num_warps": args.pop("num_warps"), "num_stages": args.pop("num_stages")}
    sig, consts, attrs = signature(fn, args)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    backend = triton.compiler.make_backend(target)
    kernel = triton.compile(src, target=target,
                            options=backend.parse_options(options).__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    regs, stack, _, local = map(int, _RESOURCES.search(usage).groups())
    return {"registers": regs, "spill_stack_bytes": stack, "local_bytes": local,
            "local_ops_in_inner_loops": local_ops_in_inner_loops(sass),
            "shared_bytes": kernel.metadata.shared, **options,
            "instructions": dict(sorted(Counter(_OPS.findall(sass)).items()))}


def attention_launches(model: str, dtype: torch.dtype, block_size: int, backend) -> dict:
    """name -> (kernel, its launch's arguments) for one model: a decode at batch 1 as the
    engine splits a long context, a short decode (one split), a prefill."""
    arch = preset(model)
    heads, kv_heads, d = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    # q is a view of the fused qkv projection; strides as the engine passes them
    strides = dict(stride_qt=(heads + 2 * kv_heads) * d, stride_qh=d, stride_ot=heads * d,
                   stride_oh=d, stride_bt=8192 // block_size)
    common = dict(q_ptr=dtype, k_cache_ptr=dtype, v_cache_ptr=dtype, out_ptr=dtype,
                  block_tables_ptr=torch.int64, seq_lens_ptr=torch.int64,
                  query_start_ptr=torch.int64, scale_log2=0.18, **strides)
    partials = dict(part_out_ptr=torch.float32, part_lse_ptr=torch.float32,
                    arrived_ptr=torch.float32)
    launches = {}
    for splits in sorted({backend.decode_splits(1, kv_heads), 1}, reverse=True):
        launches[f"decode, {splits} split{'s' if splits > 1 else ''}"] = (
            ta._decode_kernel, {**common, **partials, **backend.decode_params(
                dtype, heads, kv_heads, d, block_size, splits)})
    launches["prefill"] = (ta._prefill_kernel, {**common, "num_seqs": 4, **backend.prefill_params(
        dtype, heads, kv_heads, d, block_size)})
    return launches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90 (H100/H200)")
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-3-8b")
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args()
    backend_name, arch = args.target.split(":")
    target = GPUTarget(backend_name, int(arch), 32)
    attention = ta.TritonAttentionBackend()
    attention.num_sms = 132  # an H100 SXM / H200: decode_splits sizes the grid by it
    block_size = CacheConfig().block_size
    records = []
    print(f"{'kernel':44} {'regs':>5} {'spill':>6} {'in loop':>7} {'smem':>7}  instructions")
    for model in args.models.split(","):
        for name, (fn, launch) in attention_launches(model, torch.bfloat16, block_size,
                                                      attention).items():
            found = compile_report(fn, launch, target)
            label = f"{model} bf16 {name}, sm_{arch}"
            print(f"{label:44} {found['registers']:>5} {found['spill_stack_bytes']:>6} "
                  f"{found['local_ops_in_inner_loops']:>7} "
                  f"{found['shared_bytes']:>7}  {found['instructions']}")
            records.append(record(label + ": registers a thread", found["registers"],
                                  "registers", **found))
    if args.json:
        write(args.json, records)


if __name__ == "__main__":
    main()
