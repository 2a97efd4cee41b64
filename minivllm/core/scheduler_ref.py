"""The scheduler's policy in plain Python: the readable specification of continuous batching.

Each step gives every scheduled request a number of new tokens to compute (1 for a decode, a
chunk for a prefill) within a token budget, allocates their KV blocks (preempting by recompute
when blocks run out), and emits the step as a `ScheduledBatch` of numpy arrays. `update()` takes
the sampled tokens back, applies the stop rules and frees what finished; its outputs are arrays,
one entry per sampled row: `out_owners`, `out_tokens`, `out_finish` (FINISH_* codes of
ipc/minivllm_ipc.h) and `out_index` (the row's index among the step's sampled tokens, for the
logprobs). The request indices given back since the last call -- finished, aborted, preempted --
come out of `take_released()`: the sampler reads them there (no callback out of the scheduler).

Policies: `decode-first` gives every running decode its token before prefill chunks fill the
rest of the budget (steady inter-token latency); `prefill-first` admits and prefills new work
first and advances decodes round-robin in what remains (shorter time to first token).

Overlap (async scheduling): on a GPU the engine builds step k+1 while the GPU runs step k, so
step k's tokens are unknown when step k+1 is scheduled. `defer()` stands in for `update()` in
that loop: the step's counts advance and each sampled row gets a placeholder token, which the
next batch carries as `-1 - req_index` for the model runner to take from the device (the token
sampled there for that req_index). `resolve(tokens)` then writes the real tokens, applies the stop
rules and commits filled blocks. The engine calls schedule(k+1), launch, resolve(k), defer(k+1).
While a request has rows in flight its index is not reused (a preempted or aborted one's index
waits for the resolve: outputs name req_indices) and a preempted one is not readmitted.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from minivllm._cext.records import FINISH_ABORT, FINISH_NONE
from minivllm.config import SchedulerConfig
from minivllm.core.batch import ScheduledBatch
from minivllm.core.request import Request, RequestStatus

PLACEHOLDER = -1  # a deferred step's token, until resolve()


@dataclass
class _Deferred:
    """One row of a deferred step: what resolve() needs once its tokens are known."""

    req: Request
    computed: int  # the request's computed tokens after the row
    samples: bool  # False: a prefill chunk short of the end
    index: int     # where its sampled token goes
    live: bool     # False: it was finished or aborted before the step was deferred


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.clock = clock
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}  # owner -> request, every unfinished one
        self.free_indices = list(range(config.max_num_seqs - 1, -1, -1))  # pop() takes 0 first
        self.num_preemptions = 0
        self._scheduled: list[tuple[Request, int]] = []
        self._scheduled_ids: set[int] = set()  # id() of the requests in _scheduled
        self._rr = 0  # round-robin start of decodes under prefill-first
        self._deferred: list[_Deferred] = []  # the step in flight (defer() .. resolve())
        self._held_indices: list[int] = []  # released while in flight: free again at resolve()
        self._released: list[int] = []  # req_indices of running requests given back, until taken
        self._emit([])

    # ---- queue management -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.owner in self.requests:
            raise ValueError(f"owner {req.owner} is already in use")
        self.requests[req.owner] = req
        self._enqueue(req, front=False)

    def abort(self, owner: int) -> Optional[Request]:
        req = self.requests.get(owner)
        if req is None:
            return None
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        else:
            self.running.remove(req)
            self._release(req)
        self._finish(req, FINISH_ABORT)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._deferred)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> tuple[Optional[ScheduledBatch], list[Request]]:
        """Pick this step's work. Returns (batch or None, requests that just got a req_index)."""
        self._scheduled, self._scheduled_ids, admitted = [], set(), []
        if self._in_batch_window():
            return None, admitted
        budget = self.config.max_num_batched_tokens
        if self.config.policy == "decode-first":
            budget = self._schedule_running(budget, decodes_first=True)
            self._admit_waiting(budget, admitted)
        else:
            budget = self._schedule_running(budget, prefills_only=True)
            budget = self._admit_waiting(budget, admitted)
            self._schedule_running(budget, decodes_only=True)
        admitted = [r for r in admitted if r.status is RequestStatus.RUNNING]
        if not self._scheduled:
            return None, admitted
        return self._build_batch(), admitted

    def take_released(self) -> np.ndarray:
        """The req_indices of running requests given back since the last call, in order."""
        released, self._released = self._released, []
        return np.array(released, dtype=np.int64)

    def update(self, sampled: np.ndarray) -> int:
        """Apply this step's sampled tokens (one per sampling row, in row order). Returns the
        number of outputs, which are in `out_owners`, `out_tokens`, `out_finish`, `out_index`."""
        outputs, i = [], 0
        for req, n in self._scheduled:
            samples = req.num_computed_tokens + n == req.num_tokens
            if req.status is not RequestStatus.RUNNING:
                i += samples  # aborted after it was scheduled: its row was sampled all the same
                continue
            req.num_computed_tokens += n
            self.allocator.commit(req.req_index, req.token_ids, req.num_computed_tokens)
            if not samples:
                continue  # a prefill chunk that does not reach the end samples nothing
            token = int(sampled[i])
            i += 1
            outputs.append(self._output(req, token, req.append_token(token), i - 1))
        self._scheduled, self._scheduled_ids = [], set()
        return self._emit(outputs)

    def defer(self) -> None:
        """update() for a step whose tokens are still on the device: advance the counts and
        hold a placeholder per sampled row until resolve()."""
        deferred = []
        for req, n in self._scheduled:
            samples = req.num_computed_tokens + n == req.num_tokens
            if req.status is not RequestStatus.RUNNING:  # its row is sampled all the same
                deferred.append(_Deferred(req, 0, samples, -1, False))
                continue
            req.num_computed_tokens += n
            index = -1
            if samples:
                index = req.num_tokens
                req.num_tokens += 1
                req.token_ids[index] = PLACEHOLDER
            req.in_flight += 1
            deferred.append(_Deferred(req, req.num_computed_tokens, samples, index, True))
        self._deferred = deferred
        self._scheduled, self._scheduled_ids = [], set()

    def resolve(self, sampled: np.ndarray) -> int:
        """The deferred step's tokens (one per sampling row, in row order): write them, apply
        the stop rules, commit the blocks its rows filled. Outputs as update()'s."""
        outputs, i = [], 0
        for d in self._deferred:
            req, token = d.req, None
            if d.samples:
                token = int(sampled[i])
                i += 1
            if not d.live:
                continue
            req.in_flight -= 1
            if req.status is RequestStatus.FINISHED:
                continue  # aborted while in flight
            if req.status is RequestStatus.RUNNING:  # not preempted since
                self.allocator.commit(req.req_index, req.token_ids, d.computed)
            if token is None:
                continue
            outputs.append(self._output(req, token, req.set_token(d.index, token), i - 1))
        self._deferred = []
        self.free_indices += self._held_indices
        self._held_indices = []
        return self._emit(outputs)

    def _output(self, req: Request, token: int, code: int, index: int) -> tuple:
        """One output entry; a request that finished leaves its queue and gives back its index."""
        if code != FINISH_NONE:
            queue = self.running if req.status is RequestStatus.RUNNING else self.waiting
            queue.remove(req)
            self._release(req)
            self._finish(req, code)
        return req.owner, token, code, index

    def _emit(self, outputs: list[tuple]) -> int:
        owners, tokens, finish, index = zip(*outputs) if outputs else ((), (), (), ())
        self.out_owners = np.array(owners, dtype=np.int64)
        self.out_tokens = np.array(tokens, dtype=np.int64)
        self.out_finish = np.array(finish, dtype=np.uint8)
        self.out_index = np.array(index, dtype=np.int64)
        return len(outputs)

    # ---- policy ------------------------------------------------------------------------
    def _schedule_running(self, budget: int, decodes_first: bool = False,
                          prefills_only: bool = False, decodes_only: bool = False) -> int:
        order = list(self.running)
        if decodes_first:
            order.sort(key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        if decodes_only and order:
            start = self._rr % len(order)
            order = order[start:] + order[:start]
            self._rr += 1
        for req in order:
            if budget == 0:
                break
            remaining = req.num_tokens - req.num_computed_tokens
            if req.status is not RequestStatus.RUNNING or id(req) in self._scheduled_ids \
                    or (prefills_only and remaining == 1) or (decodes_only and remaining > 1) \
                    or req.num_tokens == req.max_total_tokens:  # full: ends when it resolves
                continue
            n = self._chunk(remaining, budget)
            if n and self._allocate_or_preempt(req, n):
                self._add_scheduled(req, n)
                budget -= n
        return budget

    def _admit_waiting(self, budget: int, admitted: list[Request]) -> int:
        while self.waiting and budget > 0 and self.free_indices:
            req = self.waiting[0]
            if req.in_flight:
                break  # preempted while in flight: readmitted after its tokens resolve
            req.req_index = self.free_indices.pop()
            # prompt logprobs come from the prefill's logits: such a request computes it all
            wanted = 0 if req.params.prompt_logprobs is not None else req.num_tokens
            cached = self.allocator.match_prefix(req.req_index, req.token_ids, wanted)
            n = self._chunk(req.num_tokens - cached, budget)
            if not n or not self.allocator.allocate(req.req_index, cached + n):
                self._release(req)  # no room now: it stays first in line
                break
            self.waiting.pop(0)
            if req.num_tokens == req.num_prompt_tokens:  # not a resumed preemption
                req.num_cached_tokens = cached
            req.num_computed_tokens = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_scheduled(req, n)
            admitted.append(req)
            budget -= n
        return budget

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens to compute this step; 0 when an unchunked prefill does not fit."""
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _allocate_or_preempt(self, req: Request, n: int) -> bool:
        """Find blocks for n more tokens, preempting the lowest-priority, latest request."""
        while not self.allocator.allocate(req.req_index, req.num_computed_tokens + n):
            victim = max((r for r in self.running if id(r) not in self._scheduled_ids),
                         key=lambda r: r.sort_key)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _add_scheduled(self, req: Request, n: int) -> None:
        self._scheduled.append((req, n))
        self._scheduled_ids.add(id(req))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self._enqueue(req, front=True)

    def _in_batch_window(self) -> bool:
        """An idle engine waits for more arrivals before its first prefill (dynamic batching)."""
        wait_s = self.config.batch_wait_ms / 1000.0
        return (wait_s > 0 and not self.running and 0 < len(self.waiting) < self.config.max_num_seqs
                and self.clock() - self.waiting[0].arrival_time < wait_s)

    # ---- bookkeeping -------------------------------------------------------------------
    def _enqueue(self, req: Request, front: bool) -> None:
        if self.config.priority == "priority":
            bisect.insort(self.waiting, req, key=lambda r: r.sort_key)
        elif front:
            self.waiting.insert(0, req)
        else:
            self.waiting.append(req)

    def _release(self, req: Request) -> None:
        if req.req_index >= 0:
            if req.status is RequestStatus.RUNNING:
                self._released.append(req.req_index)
            self.allocator.free(req.req_index)
            (self._held_indices if req.in_flight else self.free_indices).append(req.req_index)
            req.req_index = -1

    def _finish(self, req: Request, code: int) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_code = code
        del self.requests[req.owner]

    def _build_batch(self) -> ScheduledBatch:
        reqs = [r for r, _ in self._scheduled]
        qlens = np.array([n for _, n in self._scheduled], dtype=np.int64)
        starts = np.array([r.num_computed_tokens for r in reqs], dtype=np.int64)
        seq_lens = starts + qlens
        req_indices = np.array([r.req_index for r in reqs], dtype=np.int64)
        query_start = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(qlens, out=query_start[1:])
        row = np.repeat(np.arange(len(reqs)), qlens)
        positions = np.arange(query_start[-1]) - query_start[row] + starts[row]
        max_blocks = int(-(-seq_lens.max() // self.block_size))
        tables = self.allocator.block_tables[req_indices, :max_blocks]
        slot_mapping = tables[row, positions // self.block_size].astype(np.int64) * self.block_size \
            + positions % self.block_size
        input_ids = np.concatenate([r.token_ids[s:s + n] for r, (s, n) in
                                    zip(reqs, zip(starts.tolist(), qlens.tolist()))])
        input_ids = np.where(input_ids == PLACEHOLDER, -1 - req_indices[row], input_ids)
        sample_rows = np.flatnonzero(seq_lens == np.array([r.num_tokens for r in reqs]))
        return ScheduledBatch(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
                              query_start_loc=query_start, seq_lens=seq_lens, block_tables=tables,
                              req_indices=req_indices, sample_rows=sample_rows)
