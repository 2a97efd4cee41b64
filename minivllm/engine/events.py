"""The dashboard's event stream: what the step loop does, aggregated and published by the engine.

The engine binds one XPUB socket (its endpoint goes to every frontend in the register reply).
An API server with a dashboard open subscribes; ZeroMQ fans each message out, so the engine's
cost is one send per tick however many API servers and browsers listen. XPUB tells the engine
when a subscriber arrives and when the last one leaves: while none listens a step costs one
attribute test and nothing is computed.

A tick (at most every TICK_S: about 20 a second under load; an idle engine ticks when its loop
wakes) sends one compact JSON object, the control channel's encoding (no pickle;
ipc/PROTOCOL.md, "Dashboard events", gives every field): the steps since the last tick (prefill
tokens and rows, decode rows, step time, the host's gap before the step), queue lengths, KV
blocks used / cached / free, the KV grid as run-length deltas, counters, ring occupancy and the
live requests.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Optional

import numpy as np
import zmq

from minivllm.core.batch import ScheduledBatch
from minivllm.transport import control, shm
from minivllm.transport.zmq_context import readable

if TYPE_CHECKING:  # engine_proc imports this module
    from minivllm.engine.engine_proc import EngineProc

VERSION = 1
TICK_S = 0.05        # at most ~20 messages a second
KEY_FRAME_S = 1.0    # a whole KV grid this often: a listener that joins or lost one catches up
GRID_CELLS = 4000    # the grid's cells at most; a larger cache shows runs of blocks per cell
MAX_STEPS = 1024     # steps carried per message; more in one tick are counted, not listed
MAX_LISTED = 64      # live requests listed per message
SEND_QUEUE = 64      # messages queued per slow subscriber before ZeroMQ drops its new ones

# KV grid cell values: FREE, CACHED (evictable prefix-cache entry), or OWNER + the request
# index of a sequence holding a block of the cell's run (the run's highest value wins).
FREE, CACHED, OWNER = 0, 1, 2


def runs(index: np.ndarray, values: np.ndarray) -> list[int]:
    """Cells `index` (ascending) of `values` as flat [start, length, value, ...] runs of
    consecutive cells of one value."""
    if not len(index):
        return []
    v = values[index]
    breaks = np.flatnonzero((np.diff(index) != 1) | (np.diff(v) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(index)]]))
    return np.stack([index[starts], lengths, v[starts]], 1).ravel().tolist()


class KVGrid:
    """The KV cache as at most GRID_CELLS cells of `per_cell` consecutive blocks, sent as the
    runs that changed since the last message (all of them in a key frame)."""

    def __init__(self, num_blocks: int, max_cells: int = GRID_CELLS) -> None:
        self.num_blocks = num_blocks
        self.per_cell = -(-num_blocks // max_cells)
        self.cells = -(-num_blocks // self.per_cell)
        self.shown: Optional[np.ndarray] = None

    def values(self, alloc) -> np.ndarray:
        value = np.zeros(self.cells * self.per_cell, np.int64)
        value[:self.num_blocks] = alloc.registered_blocks  # CACHED, or overwritten just below
        counts, tables = alloc.num_seq_blocks, alloc.block_tables
        seqs = np.flatnonzero(counts)
        held = np.arange(tables.shape[1]) < counts[seqs, None]
        value[tables[seqs][held]] = OWNER + np.repeat(seqs, counts[seqs])
        return value.reshape(self.cells, self.per_cell).max(axis=1)

    def frame(self, alloc, key: bool) -> dict:
        cells = self.values(alloc)
        key = key or self.shown is None
        changed = np.arange(self.cells) if key else np.flatnonzero(cells != self.shown)
        self.shown = cells
        return {"cells": self.cells, "per_cell": self.per_cell, "key": key,
                "runs": runs(changed, cells)}


def batch_shape(batch: Optional[ScheduledBatch]) -> tuple[int, int, int]:
    """(prefill tokens, prefill rows, decode rows) of a step. A row of one query token counts
    as a decode (a one-token last prefill chunk too: the arrays do not tell them apart)."""
    if batch is None:
        return 0, 0, 0
    query = np.diff(batch.query_start_loc)
    prefill = query > 1
    rows = int(prefill.sum())
    return int(query[prefill].sum()), rows, len(query) - rows


class EngineEvents:
    def __init__(self, ctx: zmq.Context, endpoint: str, num_blocks: int) -> None:
        self.endpoint = endpoint
        self.socket = ctx.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, SEND_QUEUE)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscribe: each gets a key frame
        self.socket.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscriptions: a byte and a short topic
        self.socket.bind(endpoint)
        self.listening = False
        self.grid = KVGrid(num_blocks)
        self.steps = np.zeros((MAX_STEPS, 5))  # prefill tokens, prefill rows, decode rows, ms, gap
        self.num_steps = 0
        self.seq = 0
        self._key_due = True
        self._next_tick = self._next_key = 0.0
        self._last_end: Optional[float] = None

    def on_step(self, batch: Optional[ScheduledBatch], start: float, end: float) -> None:
        """Record one step (perf_counter times) if anyone listens."""
        if not self.listening:
            return
        gap = 0.0 if self._last_end is None else start - self._last_end
        self._last_end = end
        if self.num_steps < MAX_STEPS:
            self.steps[self.num_steps] = (*batch_shape(batch), (end - start) * 1e3, gap * 1e3)
        self.num_steps += 1

    def tick(self, proc: EngineProc) -> None:
        """Publish what happened since the last tick, at most every TICK_S."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK_S
        self._read_subscriptions()
        if not self.listening:
            return
        key = self._key_due or now >= self._next_key
        if key:
            self._key_due, self._next_key = False, now + KEY_FRAME_S
        self.seq += 1
        try:
            self.socket.send(control.encode(self.snapshot(proc, key)), zmq.NOBLOCK)
        except zmq.Again:
            pass  # no subscriber's queue has room: this tick is lost, a key frame follows
        self.num_steps = 0

    def _read_subscriptions(self) -> None:
        while readable(self.socket):
            message = self.socket.recv(zmq.NOBLOCK)
            if message[:1] == b"\x01":
                self.listening = self._key_due = True
            elif message[:1] == b"\x00":  # the last subscriber left
                self.listening, self.num_steps, self._last_end = False, 0, None

    def snapshot(self, proc: EngineProc, key: bool) -> dict:
        core = proc.core
        alloc, sched = core.allocator, core.scheduler
        queues, listed = self._requests(proc)
        return {
            "v": VERSION, "seq": self.seq, "pid": os.getpid(), "time": time.time(),
            "step": proc.step_count,
            "steps": np.round(self.steps[:min(self.num_steps, MAX_STEPS)], 3).tolist(),
            "steps_unlisted": max(0, self.num_steps - MAX_STEPS),
            "queues": queues,
            "kv": {"blocks": alloc.num_blocks, "block_size": alloc.block_size,
                   "used": alloc.num_used_blocks, "cached": alloc.num_cached_blocks,
                   "free": alloc.num_free_blocks - alloc.num_cached_blocks,
                   **self.grid.frame(alloc, key)},
            "counters": {**proc.counters, "preemptions": sched.num_preemptions,
                         "prefix_queries": alloc.prefix_queries,
                         "prefix_hits": alloc.prefix_hits},
            "rings": [{"name": c.name, "request": c.request_ring.used_bytes() /
                       c.request_ring.capacity, "output": c.output_ring.used_bytes() /
                       c.output_ring.capacity, "backlog": len(c.backlog)}
                      for c in proc.frontends.values()],
            "zmq": {"peers": len(proc.peers), "in_flight": proc.zmq_in_flight()},
            "requests": listed,
        }

    def _requests(self, proc: EngineProc) -> tuple[dict, list]:
        """Queue lengths, and the first MAX_LISTED live requests with their lifecycle state
        (README, "A request's life")."""
        core = proc.core
        queues = {"waiting": 0, "running": 0, "preempted": 0,
                  "grammar": len(core.grammars.waiting)}
        listed = [self._row(proc, owner, "grammar", req)
                  for owner, (req, _) in list(core.grammars.waiting.items())[:MAX_LISTED]]
        for req in core.scheduler.requests.values():
            if req.status.value == "running":
                queues["running"] += 1
                state = "prefill" if req.num_computed_tokens < req.num_prompt_tokens else "decode"
            else:
                state = "preempted" if req.num_tokens > req.num_prompt_tokens else "waiting"
                queues["waiting"] += 1
                queues["preempted"] += state == "preempted"
            if len(listed) < MAX_LISTED:
                listed.append(self._row(proc, req.owner, state, req))
        return queues, listed

    @staticmethod
    def _row(proc: EngineProc, owner: int, state: str, req) -> dict:
        client = proc.clients.get(int(proc.owners.client[owner]))
        return {"client": client.name if client else "?",
                "id": int(proc.owners.request_id[owner]), "state": state,
                "index": req.req_index if state in ("prefill", "decode") else -1,
                "prompt": req.num_prompt_tokens, "computed": req.num_computed_tokens,
                "output": req.num_tokens - req.num_prompt_tokens}

    def close(self) -> None:
        self.socket.close(linger=0)
        shm.remove_endpoint(self.endpoint)
