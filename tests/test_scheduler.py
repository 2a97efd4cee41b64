"""Scheduler: the Cython version against its pure-Python reference, plus directed tests.

The differential test drives both schedulers (each over its own allocator: Cython over Cython,
reference over reference) with the same random workload -- arrivals between steps, shared
prefixes, stop rules, aborts at any point, priorities, both policies, chunked prefill on and off,
KV budgets small enough to preempt, prefix caching on and off -- and requires identical batches,
admissions, results, block tables, allocator state and preemption counts after every step, and
the scheduler's invariants. Tokens come from a deterministic "sampler": a function of the request
and the position, so both sides (and any rerun) see the same stream. Directed tests run on both
implementations.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minivllm.config import SchedulerConfig
from minivllm.core import request as ref_request
from minivllm.core import scheduler_ref
from minivllm.core.batch import ScheduledBatch
from minivllm.core.block_allocator_ref import BlockAllocator as RefAllocator
from minivllm.core.request import RequestStatus
from minivllm.transport.protocol import FINISH_LENGTH, FINISH_NONE, FINISH_REASONS
from minivllm.sampling_params import SamplingParams

cext = pytest.importorskip("minivllm._cext.scheduler",
                           reason="Cython extension not built (python setup.py build_ext --inplace)")
from minivllm._cext.block_allocator import BlockAllocator as CAllocator  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Impl:
    scheduler: type
    allocator: type
    request: type


REF = Impl(scheduler_ref.Scheduler, RefAllocator, ref_request.Request)
CYTHON = Impl(cext.Scheduler, CAllocator, cext.Request)
IMPLS = [pytest.param(REF, id="ref"), pytest.param(CYTHON, id="cython")]

VOCAB = 10  # small, so that sampled tokens hit eos and stop ids often
EOS = 1


_OWNERS: dict[str, int] = {}  # the tests name requests; the scheduler knows int64 owners


def owner(name: str) -> int:
    return _OWNERS.setdefault(name, len(_OWNERS) * 7 + 3)  # not a row number, on purpose


def name(owner_: int) -> str:
    return next(n for n, o in _OWNERS.items() if o == owner_)


def fake_token(request_id: str, position: int) -> int:
    """The test's sampler: a fixed function of (request, position of the new token)."""
    x = (zlib.crc32(request_id.encode()) * 0x9E3779B1 + position * 0x85EBCA77) & 0xFFFFFFFF
    return (x ^ (x >> 13)) % VOCAB


class Side:
    """One implementation's scheduler, allocator and release log, driven by the test."""

    def __init__(self, impl: Impl, config: SchedulerConfig, alloc_kw: dict, max_model_len: int,
                 clock) -> None:
        self.impl = impl
        self.allocator = impl.allocator(**alloc_kw)
        self.released: list[int] = []
        self.scheduler = impl.scheduler(config, self.allocator, clock=clock)
        self.max_model_len = max_model_len

    def add(self, rid: str, prompt: list[int], params: SamplingParams, seq: int, now: float,
            priority: int):
        req = self.impl.request(owner(rid), prompt, params, (EOS,), self.max_model_len, seq,
                                now, priority)
        self.scheduler.add_request(req)
        return req

    def abort(self, rid: str):
        return self.scheduler.abort(owner(rid))

    def update(self, sampled) -> list[tuple[str, int, object]]:
        return self._outputs(self.scheduler.update(sampled))

    def resolve(self, sampled) -> list[tuple[str, int, object]]:
        return self._outputs(self.scheduler.resolve(sampled))

    def _outputs(self, n: int) -> list[tuple[str, int, object]]:
        """The output arrays as (name, token, finish reason), checked against each other."""
        s = self.scheduler
        arrays = (s.out_owners, s.out_tokens, s.out_finish, s.out_index)
        assert [len(a) for a in arrays] == [n] * 4
        assert [a.dtype for a in arrays] == [np.int64, np.int64, np.uint8, np.int64]
        return [(name(o), t, FINISH_REASONS[f])
                for o, t, f in zip(*(a.tolist() for a in arrays[:3]))]

    def take_released(self) -> list[int]:
        self.released += self.scheduler.take_released().tolist()
        return self.released

    def sampled(self, batch: ScheduledBatch) -> np.ndarray:
        """The sampler's tokens for the batch's sampling rows."""
        by_index = {r.req_index: name(r.owner) for r in self.scheduler.running}
        return np.array([fake_token(by_index[int(batch.req_indices[row])], int(batch.seq_lens[row]))
                         for row in batch.sample_rows], dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# what is compared, and what must always hold
# ------------------------------------------------------------------------------------------------
def batch_view(batch):
    if batch is None:
        return None
    return {f.name: (getattr(batch, f.name).dtype.str, getattr(batch, f.name).shape,
                     getattr(batch, f.name).tolist()) for f in dataclasses.fields(batch)}


def request_view(r) -> tuple:
    return (r.owner, r.priority, r.arrival_seq, r.num_prompt_tokens, r.max_total_tokens,
            r.token_ids.tolist(), r.num_tokens, r.num_computed_tokens, r.num_cached_tokens,
            r.req_index, r.status, r.finish_code, r.output_token_ids.tolist(), r.sort_key)


def side_view(side: Side) -> tuple:
    s, a = side.scheduler, side.allocator
    free, lru = a._check_consistency()
    return ([r.owner for r in s.waiting], [r.owner for r in s.running],
            sorted(request_view(r) for r in s.requests.values()), s.num_preemptions,
            list(side.take_released()), a.block_tables.tolist(), a.num_seq_blocks.tolist(),
            a.ref_counts.tolist(), free, lru, a.num_used_blocks, a.num_free_blocks,
            a.num_cached_blocks, a.prefix_queries, a.prefix_hits)


def check_invariants(side: Side) -> None:
    s, a = side.scheduler, side.allocator
    bs, tables, nblocks, refs = a.block_size, a.block_tables, a.num_seq_blocks, a.ref_counts
    running, waiting = s.running, s.waiting
    assert all(r.status is RequestStatus.RUNNING for r in running)
    assert all(r.status is RequestStatus.WAITING and r.req_index == -1 for r in waiting)
    assert len(running) <= s.config.max_num_seqs
    assert {r.owner for r in running + waiting} == set(s.requests)
    req_indices = {r.req_index: r for r in running}
    assert len(req_indices) == len(running) and all(0 <= x < a.max_seqs for x in req_indices)
    for req_index in range(a.max_seqs):
        if req_index not in req_indices:
            assert nblocks[req_index] == 0, f"index {req_index}: blocks but no running request"
    for r in running:
        assert r.num_computed_tokens < r.num_tokens <= r.max_total_tokens
        assert nblocks[r.req_index] * bs >= r.num_computed_tokens
    # Ref counts equal table references; a block in several tables is a shared prefix block:
    # at the same index in each, holding the same tokens there.
    holders: dict[int, list[tuple[int, int]]] = {}
    for req_index in range(a.max_seqs):
        for i, b in enumerate(tables[req_index, :nblocks[req_index]].tolist()):
            holders.setdefault(b, []).append((req_index, i))
        assert not tables[req_index, nblocks[req_index]:].any()
    for b in range(a.num_blocks):
        assert refs[b] == len(holders.get(b, ())), f"block {b}: ref count != table references"
    for b, where in holders.items():
        if len(where) > 1:
            assert len({i for _, i in where}) == 1, f"block {b} shared at different positions"
            i = where[0][1]
            contents = {tuple(req_indices[req_index].token_ids[i * bs:(i + 1) * bs].tolist())
                        for req_index, _ in where}
            assert len(contents) == 1, f"block {b} shared by different prefixes"
    used = int((refs > 0).sum())
    cached = a.num_cached_blocks
    assert a.num_used_blocks == used
    assert used + (a.num_free_blocks - cached) + cached == a.num_blocks  # used + free + cached
    assert 0 <= a.prefix_hits <= a.prefix_queries


def check_batch_tables(side: Side, batch: ScheduledBatch) -> None:
    width = batch.block_tables.shape[1]
    np.testing.assert_array_equal(batch.block_tables,
                                  side.allocator.block_tables[batch.req_indices, :width])


def check_drained(side: Side) -> None:
    s, a = side.scheduler, side.allocator
    assert not s.has_unfinished() and not s.requests
    assert a.num_used_blocks == 0 and not a.ref_counts.any() and not a.block_tables.any()
    assert a.num_free_blocks == a.num_blocks


# ------------------------------------------------------------------------------------------------
# the differential test
# ------------------------------------------------------------------------------------------------
@st.composite
def setups(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(8, 64))
    config = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(1, 48)),
        enable_chunked_prefill=draw(st.booleans()),
        policy=draw(st.sampled_from(["decode-first", "prefill-first"])),
        priority=draw(st.sampled_from(["fcfs", "priority"])),
        batch_wait_ms=draw(st.sampled_from([0.0, 0.0, 3.0])))
    kv_tokens = draw(st.one_of(st.integers(4, 64), st.integers(64, 256)))  # small: preemption
    alloc_kw = dict(num_blocks=max(1, kv_tokens // block_size), block_size=block_size,
                    max_seqs=config.max_num_seqs,
                    max_blocks_per_seq=-(-max_model_len // block_size),
                    enable_prefix_caching=draw(st.booleans()))
    prefix = st.integers(0, 24).flatmap(
        lambda n: st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    prefixes = draw(st.lists(prefix, min_size=1, max_size=3))
    return config, alloc_kw, max_model_len, prefixes


def draw_request(data, prefixes: list[list[int]], max_model_len: int):
    prefix = data.draw(st.sampled_from(prefixes))
    suffix = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=16))
    max_tokens = data.draw(st.one_of(st.none(), st.integers(1, 12)))
    params = SamplingParams(
        max_tokens=max_tokens, min_tokens=data.draw(st.integers(0, max_tokens or 4)),
        ignore_eos=data.draw(st.booleans()),
        stop_token_ids=data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=2)))
    return (prefix + suffix)[-(max_model_len - 1):], params, data.draw(st.integers(0, 3))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups(), data=st.data())
@pytest.mark.parametrize("deferred", [False, True], ids=["update", "defer-resolve"])
def test_cython_scheduler_matches_reference(deferred, setup, data):
    """update(): each step's tokens applied at once. defer-resolve: the overlap loop, step k's
    tokens applied after step k+1 is scheduled (schedule, resolve(k), defer)."""
    config, alloc_kw, max_model_len, prefixes = setup
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    ref, cy = (Side(impl, config, alloc_kw, max_model_len, clock) for impl in (REF, CYTHON))
    ids: list[str] = []
    reasons: set[str] = set()
    num_steps = data.draw(st.integers(1, 40), label="steps with arrivals")
    idle = 0
    in_flight = None  # the deferred step's tokens
    for step in range(num_steps + 200):
        arriving = step < num_steps
        if arriving:
            for _ in range(data.draw(st.integers(0, 3), label="arrivals")):
                prompt, params, priority = draw_request(data, prefixes, max_model_len)
                rid = f"r{len(ids)}"
                for side in (ref, cy):
                    side.add(rid, prompt, params, len(ids), now[0], priority)
                ids.append(rid)
            abort_both(ref, cy, data, ids)
        (batch_r, adm_r), (batch_c, adm_c) = ref.scheduler.schedule(), cy.scheduler.schedule()
        assert batch_view(batch_c) == batch_view(batch_r)
        if batch_c is not None:
            check_batch_tables(cy, batch_c)
        assert [r.owner for r in adm_c] == [r.owner for r in adm_r]
        sampled = None if batch_r is None else ref.sampled(batch_r)
        if arriving:
            abort_both(ref, cy, data, ids)  # between schedule() and update() / resolve()
        if not deferred and sampled is not None:
            compare_results(ref.update(sampled), cy.update(sampled), reasons)
        if deferred:
            if in_flight is not None:
                compare_results(ref.resolve(in_flight), cy.resolve(in_flight), reasons)
            if batch_r is not None:
                ref.scheduler.defer()
                cy.scheduler.defer()
            in_flight = sampled
        assert side_view(cy) == side_view(ref)
        check_invariants(ref)
        check_invariants(cy)
        now[0] += 0.001
        idle = idle + 1 if batch_r is None else 0
        if not arriving and (not ref.scheduler.has_unfinished() or idle > 10):
            break  # done, or stuck (a prompt that never fits): the aborts below end it
    event(f"preempted: {ref.scheduler.num_preemptions > 0}")
    event(f"left unfinished: {ref.scheduler.has_unfinished()}")
    event(f"prefix cache hits: {ref.allocator.prefix_hits > 0}")
    event(f"finish reasons: {sorted(reasons)}")
    for rid in ids:
        assert (cy.abort(rid) is None) == (ref.abort(rid) is None)
    if in_flight is not None:  # the last deferred step: only aborted requests left in it
        assert ref.resolve(in_flight) == [] == cy.resolve(in_flight)
    assert side_view(cy) == side_view(ref)
    check_drained(ref)
    check_drained(cy)


def compare_results(res_r: list, res_c: list, reasons: set) -> None:
    assert res_c == res_r
    reasons.update(f for _, _, f in res_r if f)


def abort_both(ref: Side, cy: Side, data, ids: list[str]) -> None:
    if ids and data.draw(st.integers(0, 4), label="abort?") == 0:
        rid = data.draw(st.sampled_from(ids), label="abort id")
        got_r, got_c = ref.abort(rid), cy.abort(rid)
        assert (got_c is None) == (got_r is None)
        if got_r is not None:
            event(f"aborted a {'scheduled' if got_r in [r for r, _ in ref.scheduler._scheduled] else 'queued'} request")
            assert request_view(got_c) == request_view(got_r)


# ------------------------------------------------------------------------------------------------
# directed tests, on both implementations
# ------------------------------------------------------------------------------------------------
def make_side(impl: Impl, clock=lambda: 0.0, num_blocks: int = 64, block_size: int = 4,
              max_model_len: int = 128, prefix_caching: bool = True, **sched) -> Side:
    config = SchedulerConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 64, **sched})
    alloc_kw = dict(num_blocks=num_blocks, block_size=block_size, max_seqs=config.max_num_seqs,
                    max_blocks_per_seq=-(-max_model_len // block_size),
                    enable_prefix_caching=prefix_caching)
    return Side(impl, config, alloc_kw, max_model_len, clock)


def run_to_end(side: Side, max_steps: int = 1000,
               deferred: bool = False) -> tuple[dict[str, list[int]], int]:
    """Step until nothing is left; return each request's output tokens and the number of
    prompt tokens scheduled (computed, not served by the prefix cache). `deferred`: the
    overlap loop (schedule k+1, resolve k, defer k+1)."""
    outputs: dict[str, list[int]] = {}
    prefill_tokens = 0
    in_flight = None
    for _ in range(max_steps):
        if not side.scheduler.has_unfinished():
            return outputs, prefill_tokens
        batch, _ = side.scheduler.schedule()
        sampled = None if batch is None else side.sampled(batch)
        if batch is not None:
            qlens = np.diff(batch.query_start_loc)
            prefill_tokens += int(qlens[qlens > 1].sum())
        if deferred:
            results = [] if in_flight is None else side.resolve(in_flight)
            if batch is not None:
                side.scheduler.defer()
            in_flight = sampled
        else:
            results = [] if batch is None else side.update(sampled)
        for rid, token, _ in results:
            outputs.setdefault(rid, []).append(token)
    raise AssertionError("requests did not finish")


@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_cache_skips_a_repeated_long_prefix(impl):
    rng = np.random.default_rng(0)
    prefix = rng.integers(2, VOCAB, 64).tolist()
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    cold = make_side(impl)
    cold.add("a", prefix + [3, 4], params, 0, 0.0, 0)
    _, cold_tokens = run_to_end(cold)
    hits_before = cold.allocator.prefix_hits
    second = cold.add("b", prefix + [5, 6, 7], params, 1, 0.0, 0)
    _, warm_tokens = run_to_end(cold)
    assert cold_tokens == 66
    assert second.num_cached_tokens == 64  # every full block of the shared prefix
    assert warm_tokens == 3
    assert cold.allocator.prefix_hits - hits_before == 16  # 64 tokens / 4 per block
    check_drained(cold)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_caching_off_recomputes(impl):
    side = make_side(impl, prefix_caching=False)
    prompt = list(range(2, 10)) * 4
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    side.add("a", prompt, params, 0, 0.0, 0)
    side.add("b", prompt, params, 1, 0.0, 0)
    _, tokens = run_to_end(side)
    assert tokens == 2 * len(prompt) and side.allocator.prefix_hits == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_window_waits_then_releases_on_arrivals(impl):
    now = [100.0]
    side = make_side(impl, clock=lambda: now[0], batch_wait_ms=10.0, max_num_seqs=3)
    params = SamplingParams(max_tokens=2)
    side.add("a", [2, 3, 4], params, 0, now[0], 0)
    assert side.scheduler.schedule() == (None, [])
    now[0] += 0.005
    side.add("b", [2, 3, 5], params, 1, now[0], 0)
    assert side.scheduler.schedule() == (None, [])  # 5 ms of 10, 2 arrivals of 3
    side.add("c", [2, 3, 6], params, 2, now[0], 0)  # max_num_seqs arrivals: go at once
    batch, admitted = side.scheduler.schedule()
    assert [name(r.owner) for r in admitted] == ["a", "b", "c"] and batch.num_seqs == 3


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_window_releases_at_the_deadline(impl):
    now = [100.0]
    side = make_side(impl, clock=lambda: now[0], batch_wait_ms=10.0)
    side.add("a", [2, 3, 4], SamplingParams(max_tokens=2), 0, now[0], 0)
    now[0] += 0.0099
    assert side.scheduler.schedule() == (None, [])
    now[0] += 0.0002
    batch, admitted = side.scheduler.schedule()
    assert [name(r.owner) for r in admitted] == ["a"] and batch.num_seqs == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_tight_kv_budget_preempts_and_every_request_completes(impl):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, VOCAB, int(n)).tolist() for n in rng.integers(10, 26, 6)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    results = []
    for num_blocks in (256, 16):  # roomy, then 64 tokens for ~300 needed
        side = make_side(impl, num_blocks=num_blocks)
        for i, p in enumerate(prompts):
            side.add(f"r{i}", p, params, i, 0.0, 0)
        outputs, _ = run_to_end(side)
        results.append((outputs, side.scheduler.num_preemptions))
        check_drained(side)
    (roomy, roomy_preempted), (tight, tight_preempted) = results
    assert roomy_preempted == 0 and tight_preempted > 0
    assert tight == roomy and all(len(v) == 30 for v in tight.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_deferred_steps_give_the_same_tokens(impl):
    """The overlap loop samples each request's tokens at the same positions as update(): the
    same outputs and finish points (stop ids, eos, length), under preemption too; a request's
    one wasted row after its stop changes nothing."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, VOCAB, int(n)).tolist() for n in rng.integers(10, 26, 8)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 30)), ignore_eos=bool(i % 2),
                             stop_token_ids=[int(i % 3) + 2] if i % 3 else [])
              for i in range(len(prompts))]
    for num_blocks in (256, 16):
        runs = []
        for deferred in (False, True):
            side = make_side(impl, num_blocks=num_blocks)
            for i, (p, sp) in enumerate(zip(prompts, params)):
                side.add(f"r{i}", p, sp, i, 0.0, 0)
            runs.append(run_to_end(side, deferred=deferred)[0])
            check_drained(side)
            if num_blocks == 16:
                assert side.scheduler.num_preemptions > 0
        assert runs[1] == runs[0] and len(runs[0]) == len(prompts)


@pytest.mark.parametrize("impl", IMPLS)
def test_deferred_placeholders_name_their_index(impl):
    side = make_side(impl)
    side.add("a", [2, 3, 4], SamplingParams(max_tokens=5, ignore_eos=True), 0, 0.0, 0)
    batch, _ = side.scheduler.schedule()
    side.scheduler.defer()
    batch, _ = side.scheduler.schedule()  # a's decode, before its first token is known
    req_index = int(batch.req_indices[0])
    assert batch.input_ids.tolist() == [-1 - req_index] and batch.positions.tolist() == [3]
    assert side.resolve(np.array([7])) == [("a", 7, None)]
    side.scheduler.defer()
    batch, _ = side.scheduler.schedule()
    assert batch.input_ids.tolist() == [-1 - req_index]  # the token of the step in flight again
    side.scheduler.resolve(np.array([8]))
    assert side.scheduler.requests[owner("a")].output_token_ids.tolist() == [7, 8]


@pytest.mark.parametrize("impl", IMPLS)
def test_abort_between_schedule_and_update_keeps_rows_aligned(impl):
    side = make_side(impl)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    side.add("a", [2, 3, 4], params, 0, 0.0, 0)
    side.add("b", [5, 6, 7], params, 1, 0.0, 0)
    batch, _ = side.scheduler.schedule()
    assert batch.sample_rows.tolist() == [0, 1]
    side.abort("a")
    assert side.update(np.array([8, 9])) == [("b", 9, None)]  # b's row, not a's token
    assert side.scheduler.out_index.tolist() == [1]  # its logprobs are the second row's
    assert side.take_released() == [0]
    run_to_end(side)
    check_drained(side)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_tables_stay_right_when_the_batch_width_changes(impl):
    """Rows of a narrower step, a wider step with fewer rows between: the wide row overwrites
    where the narrow layout kept a row that comes back (a trap for a copy-saving scheduler)."""
    side = make_side(impl, policy="prefill-first", max_num_batched_tokens=10)
    long = SamplingParams(max_tokens=20, ignore_eos=True)
    side.add("a", [2, 3, 4, 5], long, 0, 0.0, 0)
    side.add("b", [6, 7, 8, 9], long, 1, 0.0, 0)
    widths = []
    for step in range(3):
        if step == 2:  # a 10-token prefill takes the whole budget, then finishes
            side.add("c", [3] * 10, SamplingParams(max_tokens=1), 2, 0.0, 0)
        batch, _ = side.scheduler.schedule()
        widths.append((batch.num_seqs, batch.block_tables.shape[1]))
        check_batch_tables(side, batch)
        side.update(side.sampled(batch))
    batch, _ = side.scheduler.schedule()
    check_batch_tables(side, batch)
    assert widths == [(2, 1), (2, 2), (1, 3)] and batch.block_tables.shape == (2, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_stop_rules(impl):
    side = make_side(impl)
    side.add("eos", [2, 3], SamplingParams(max_tokens=10), 0, 0.0, 0)
    side.add("min", [2, 3], SamplingParams(max_tokens=10, min_tokens=2), 1, 0.0, 0)
    side.add("stop", [2, 3], SamplingParams(max_tokens=10, stop_token_ids=[7]), 2, 0.0, 0)
    side.add("len", [2, 3], SamplingParams(max_tokens=2, ignore_eos=True), 3, 0.0, 0)
    side.scheduler.schedule()
    got = {rid: (t, f) for rid, t, f in side.update(np.array([1, 1, 3, 1]))}
    assert got == {"eos": (1, "stop"), "min": (1, None), "stop": (3, None), "len": (1, None)}
    side.scheduler.schedule()
    got = {rid: (t, f) for rid, t, f in side.update(np.array([1, 7, 4]))}
    assert got == {"min": (1, "stop"), "stop": (7, "stop"), "len": (4, "length")}
    check_drained(side)


@pytest.mark.parametrize("impl", IMPLS)
def test_priority_orders_the_waiting_queue(impl):
    side = make_side(impl, priority="priority", max_num_seqs=1)
    params = SamplingParams(max_tokens=1)
    for i, prio in enumerate([2, 0, 1, 0]):
        side.add(f"r{i}", [2, 3], params, i, 0.0, prio)
    assert [name(r.owner) for r in side.scheduler.waiting] == ["r1", "r3", "r2", "r0"]


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicate_owner_is_refused(impl):
    side = make_side(impl)
    side.add("a", [2, 3], SamplingParams(), 0, 0.0, 0)
    with pytest.raises(ValueError, match="already in use"):
        side.add("a", [2, 3], SamplingParams(), 1, 0.0, 0)


# ------------------------------------------------------------------------------------------------
# the Cython Request and Scheduler's own surface
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(), dict(max_tokens=None), dict(ignore_eos=True),
                                    dict(stop_token_ids=[4, 5], min_tokens=2, max_tokens=3)])
def test_request_matches_reference(kwargs):
    params = SamplingParams(**kwargs)
    args = (owner("x"), [5, 6, 7], params, (4, 9), 12, 3, 1.5, 2)
    ref, cy = ref_request.Request(*args), cext.Request(*args)
    assert request_view(cy) == request_view(ref)
    assert (cy.params, cy.arrival_time) == (ref.params, ref.arrival_time)
    for token in [4, 5, 9, 4, 1, 2, 3, 4, 5]:
        if ref.num_tokens == ref.max_total_tokens:
            break
        assert cy.append_token(token) == ref.append_token(token)
        assert request_view(cy) == request_view(ref)


def test_cython_state_the_c_loops_trust_is_read_only():
    side = make_side(CYTHON)
    req = side.add("x", [1, 2], SamplingParams(), 0, 0.0, 0)
    with pytest.raises(AttributeError):
        req.num_tokens = 100
    with pytest.raises(TypeError):
        del side.scheduler.requests[owner("x")]  # the queues borrow their references from it
    side.abort("x")
    with pytest.raises(ValueError, match="finished"):
        side.scheduler.add_request(req)


def test_cython_scheduler_needs_the_cython_allocator():
    with pytest.raises(TypeError):
        cext.Scheduler(SchedulerConfig(), RefAllocator(8, 4, 256, 4))


def test_cython_scheduler_refuses_a_prompt_with_no_room_for_output():
    side = make_side(CYTHON, max_model_len=8)
    with pytest.raises(ValueError, match="no room"):
        side.add("a", list(range(8)), SamplingParams(), 0, 0.0, 0)


def test_cython_update_checks_the_sampled_array():
    side = make_side(CYTHON)
    side.add("a", [2, 3], SamplingParams(), 0, 0.0, 0)
    side.scheduler.schedule()
    with pytest.raises(ValueError, match="needs 1 sampled"):
        side.scheduler.update(np.array([], dtype=np.int64))


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_are_arrays_of_owners_tokens_and_codes(impl):
    side = make_side(impl)
    side.add("a", [2, 3], SamplingParams(max_tokens=1), 0, 0.0, 0)
    side.add("b", [2, 4, 5], SamplingParams(max_tokens=4), 1, 0.0, 0)
    side.scheduler.schedule()
    assert side.scheduler.update(np.array([7, 8])) == 2
    s = side.scheduler
    assert s.out_owners.tolist() == [owner("a"), owner("b")] and s.out_tokens.tolist() == [7, 8]
    assert s.out_finish.tolist() == [FINISH_LENGTH, FINISH_NONE]
    assert s.take_released().tolist() == [0] and s.take_released().tolist() == []
    assert s.has_unfinished() and list(s.requests) == [owner("b")]
