"""The scheduler and KV-block allocator the engine runs, by `SchedulerConfig.implementation`.

"cython" (the default) is continuous batching compiled in Cython: csrc/scheduler.pyx driving the
Cython block allocator through its C API. "python" is its readable specification and test
oracle: core/scheduler_ref.py with core/request.py's Request over core/block_allocator_ref.py,
which have the same API and behaviour and run the whole engine as a drop-in. A Scheduler takes
only its own implementation's Request and BlockAllocator.
"""
from __future__ import annotations

from typing import NamedTuple


class CoreImpl(NamedTuple):
    Scheduler: type
    Request: type
    BlockAllocator: type


def core_implementation(name: str) -> CoreImpl:
    if name == "python":
        from minivllm.core.block_allocator_ref import BlockAllocator
        from minivllm.core.request import Request
        from minivllm.core.scheduler_ref import Scheduler
    else:
        from minivllm._cext.block_allocator import BlockAllocator
        from minivllm._cext.scheduler import Request, Scheduler
    return CoreImpl(Scheduler, Request, BlockAllocator)
