"""The process's one ZeroMQ context.

A context caught in one garbage cycle with its sockets hangs the collector for good: the
collector clears the weak references through which `Context.destroy()` finds the sockets, so
`term()` waits on sockets nobody will close (found as a suite that hung in a test that had
nothing to do with it). The process-wide instance is never collected; each part closes its
own sockets and nobody terminates the context. LINGER 0: no socket of ours waits on a peer
that is gone.
"""
from __future__ import annotations

import zmq


def process_context() -> zmq.Context:
    ctx = zmq.Context.instance()
    ctx.setsockopt(zmq.LINGER, 0)
    return ctx
