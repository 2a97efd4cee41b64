"""The process's one ZeroMQ context, and the test for a message waiting on a socket.

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


# (plain ints: `int & zmq.POLLIN`, an enum.Flag, runs Python code, ~0.8 us a call)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def readable(socket: zmq.Socket) -> bool:
    """A message waits (ZMQ_EVENTS: no exception and no receive attempt, as recv(NOBLOCK) +
    zmq.Again costs). It also processes the socket's pending state changes, which clears its
    file descriptor's readiness (ZMQ_FD)."""
    return bool(socket.getsockopt(_EVENTS) & _POLLIN)
