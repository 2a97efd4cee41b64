"""The scheduler (the engine's import point): continuous batching compiled in Cython.

The implementation is csrc/scheduler.pyx, driving the Cython block allocator through its C API;
its readable specification and test oracle is the pure-Python scheduler_ref.Scheduler with
core/request.py's Request, which have the same API and behaviour. Requests given to this
Scheduler must be this module's Request (the same constructor, with C fields).
"""
from minivllm._cext.scheduler import FINISH_REASONS, Request, Scheduler

__all__ = ["Scheduler", "Request", "FINISH_REASONS"]
