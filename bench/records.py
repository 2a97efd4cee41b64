"""Benchmark results as JSON records: name, value, unit (+ peer, ratio), with the run's context.

Every bench script writes a list of records; each carries the exact command, the machine and
the versions, so a committed result can be traced and compared run to run.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from importlib import metadata
from typing import Optional


def _version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# The CPU features the kernels dispatch on: what a CPU result depends on.
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
              "avx512dq", "avx512_bf16", "avx512_vnni", "amx_bf16")


def context() -> dict:
    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines()
                    if l.startswith("model name")), cpu)
        present = next((l.split(":", 1)[1].split() for l in info.splitlines()
                        if l.startswith("flags")), [])
        flags = [f for f in _ISA_FLAGS if f in present]
    except OSError:
        pass
    machine = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(),
               "python": platform.python_version()}
    try:
        import torch
        if torch.cuda.is_available():
            machine["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return {
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
        "machine": machine,
        "versions": {p: _version(p) for p in ("minivllm", "torch", "transformers", "numpy",
                                              "Cython", "pyzmq", "triton") if _version(p)},
    }


def record(name: str, value: float, unit: str, peer: Optional[float] = None,
           peer_name: Optional[str] = None, **extra) -> dict:
    rec = {"name": name, "value": value, "unit": unit}
    if peer is not None:
        rec.update(peer=peer, peer_name=peer_name, ratio=value / peer if peer else None)
    rec.update(extra)
    return rec


def write(path: Optional[str], records: list[dict]) -> None:
    ctx = context()
    out = [dict(r, **ctx) for r in records]
    for r in records:
        ratio = f"  ({r['ratio']:.2f}x {r['peer_name']})" if r.get("ratio") else ""
        print(f"{r['name']:<60} {r['value']:>12.2f} {r['unit']}{ratio}")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
