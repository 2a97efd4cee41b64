"""Block allocator: the Cython version against its pure-Python reference, plus directed tests.

Every directed test runs on both implementations; the differential tests drive both with the
same random operations and require identical results and identical internal order (free list
and LRU), checking the allocator's invariants after every step.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from minivllm.core.block_allocator_ref import BlockAllocator as RefAllocator
from minivllm.core.block_allocator_ref import hash_block as ref_hash

cext = pytest.importorskip("minivllm._cext.block_allocator",
                           reason="Cython extension not built (python setup.py build_ext --inplace)")
CAllocator = cext.BlockAllocator

IMPLS = [pytest.param(RefAllocator, id="ref"), pytest.param(CAllocator, id="cython")]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def check_invariants(a) -> None:
    """Invariants that hold after every operation, for either implementation."""
    a._check_consistency()  # free list / LRU / hash table agree with ref counts
    tables, nseq, refs = a.block_tables, a.num_seq_blocks, a.ref_counts
    owners = np.zeros(a.num_blocks, dtype=np.int64)
    for seq in range(tables.shape[0]):
        row = tables[seq, :nseq[seq]]
        assert len(set(row.tolist())) == len(row), f"seq {seq} holds a block twice"
        assert not tables[seq, nseq[seq]:].any(), f"seq {seq}: unused entries not 0"
        np.add.at(owners, row, 1)
    # refcount == number of table references; so a block is shared only by refcounting
    np.testing.assert_array_equal(refs, owners)
    used = int((refs > 0).sum())
    assert a.num_used_blocks == used
    assert used + a.num_free_blocks == a.num_blocks        # used + free list + cached
    assert 0 <= a.num_cached_blocks <= a.num_free_blocks
    assert a.usage == pytest.approx(used / a.num_blocks)
    assert 0 <= a.prefix_hits <= a.prefix_queries


def check_shared_blocks_are_cached(ref: RefAllocator) -> None:
    """Reference-only: a block in two tables got there through the prefix cache."""
    for b in np.flatnonzero(ref.ref_counts > 1):
        assert ref._registered[b], f"block {b} shared but not in the prefix cache"


def snapshot(a) -> tuple:
    free, lru = a._check_consistency()
    return (a.block_tables.tolist(), a.num_seq_blocks.tolist(), a.ref_counts.tolist(),
            free, lru, a.num_free_blocks, a.num_used_blocks, a.num_cached_blocks,
            a.prefix_queries, a.prefix_hits)


def run_request(a, seq, tokens, num_tokens=None) -> int:
    """A request's whole life up to free: match, allocate, compute (commit). Returns cached."""
    n = len(tokens) if num_tokens is None else num_tokens
    cached = a.match_prefix(seq, tokens, n)
    assert a.allocate(seq, n)
    a.commit(seq, tokens, n)
    return cached


def toks(*values, dtype=np.int64) -> np.ndarray:
    return np.array(values, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# hash
# ------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(parent=st.integers(0, 2**64 - 1),
       tokens=st.lists(st.integers(-2**31, 2**31 - 1), max_size=40),
       dtype=st.sampled_from([np.int32, np.int64]))
def test_hash_bit_identical(parent, tokens, dtype):
    arr = np.array(tokens, dtype=dtype)
    assert cext.hash_block(parent, arr) == ref_hash(parent, arr)
    assert ref_hash(parent, arr) == ref_hash(parent, arr.astype(np.int64))


def test_hash_is_chained_and_order_sensitive():
    a, b = toks(1, 2, 3, 4), toks(4, 3, 2, 1)
    assert ref_hash(0, a) != ref_hash(0, b)
    assert ref_hash(0, a) != ref_hash(ref_hash(0, a), a)


# ------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("args", [(0, 4, 2, 2), (8, 0, 2, 2), (8, 4, 0, 2), (8, 4, 2, 0),
                                  (-1, 4, 2, 2), (8, 4, 2, 2**31)])
def test_bad_sizes(impl, args):
    with pytest.raises(ValueError):
        impl(*args)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments(impl):
    a = impl(num_blocks=8, block_size=4, max_seqs=2, max_blocks_per_seq=3)
    t = np.arange(20, dtype=np.int64)
    for seq in (-1, 2):
        with pytest.raises(ValueError):
            a.allocate(seq, 4)
        with pytest.raises(ValueError):
            a.match_prefix(seq, t, 4)
        with pytest.raises(ValueError):
            a.free(seq)
    with pytest.raises(ValueError):
        a.allocate(0, 13)            # 4 blocks > max_blocks_per_seq
    with pytest.raises(ValueError):
        a.allocate(0, -1)
    with pytest.raises(ValueError):
        a.match_prefix(0, t, 21)     # more tokens than the array holds
    with pytest.raises(ValueError):
        a.match_prefix(0, t.reshape(4, 5), 4)
    with pytest.raises(ValueError):
        a.match_prefix(0, t.astype(np.float32), 4)
    assert a.allocate(0, 5)
    with pytest.raises(ValueError):
        a.commit(0, t, 9)            # beyond the seq's 2 blocks
    with pytest.raises(ValueError):
        a.match_prefix(0, t, 8)      # seq already holds blocks
    check_invariants(a)


# ------------------------------------------------------------------------------------------------
# allocation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_allocate_grows_table_in_place(impl):
    a = impl(num_blocks=10, block_size=4, max_seqs=3, max_blocks_per_seq=4)
    tables = a.block_tables
    assert a.allocate(1, 5) and a.num_seq_blocks[1] == 2
    assert a.allocate(1, 8) and a.num_seq_blocks[1] == 2   # already covered: no-op
    assert a.allocate(1, 9) and a.num_seq_blocks[1] == 3
    assert a.block_tables is tables and tables[1, :3].tolist() == [0, 1, 2]
    assert a.allocate(0, 0) and a.num_seq_blocks[0] == 0
    assert a.num_used_blocks == 3 and a.num_free_blocks == 7 and a.usage == pytest.approx(0.3)
    check_invariants(a)
    a.free(1)
    assert a.num_used_blocks == 0 and not tables.any()
    check_invariants(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_allocate_failure_changes_nothing(impl):
    a = impl(num_blocks=6, block_size=2, max_seqs=3, max_blocks_per_seq=6)
    t = np.arange(100, 112, dtype=np.int64)
    run_request(a, 0, t, 6)      # 3 blocks, registered
    a.free(0)                    # -> 3 cached blocks, 3 free
    assert a.allocate(1, 2)      # 1 block from the free list
    before = snapshot(a)
    assert not a.allocate(2, 12)  # needs 6, only 5 allocatable
    assert snapshot(a) == before
    assert a.match_prefix(2, t, 6) == 4   # the cached blocks survived the failed attempt
    check_invariants(a)


# ------------------------------------------------------------------------------------------------
# prefix caching
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_prefix_hit_same_prompt(impl, dtype):
    bs = 4
    a = impl(num_blocks=32, block_size=bs, max_seqs=4, max_blocks_per_seq=8)
    prompt = np.arange(1000, 1030, dtype=dtype)    # 7 full blocks + 2 tokens
    assert run_request(a, 0, prompt) == 0
    # While the first request still runs: its blocks are shared.
    assert a.match_prefix(1, prompt, 30) == 7 * bs
    assert a.block_tables[1, :7].tolist() == a.block_tables[0, :7].tolist()
    assert (a.ref_counts[a.block_tables[0, :7]] == 2).all()
    assert a.prefix_hits == 7 and a.prefix_queries == 8   # first request: 1 miss
    check_invariants(a)
    a.free(0)
    a.free(1)
    # After both finished: still cached, evictable, not used.
    assert a.num_used_blocks == 0 and a.num_cached_blocks == 7
    assert a.match_prefix(2, prompt.astype(np.int64), 30) == 7 * bs
    assert a.num_cached_blocks == 0   # hits left the LRU
    check_invariants(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_at_least_one_token_left_to_compute(impl):
    a = impl(num_blocks=16, block_size=4, max_seqs=2, max_blocks_per_seq=4)
    prompt = np.arange(16, dtype=np.int64)       # exactly 4 full blocks
    run_request(a, 0, prompt)
    assert a.match_prefix(1, prompt, 16) == 12   # 3 blocks: the last token must be computed
    a.free(1)
    assert a.match_prefix(1, prompt, 0) == 0
    assert a.match_prefix(1, prompt, 1) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_hit_stops_at_first_difference(impl):
    bs = 4
    a = impl(num_blocks=32, block_size=bs, max_seqs=4, max_blocks_per_seq=8)
    prompt = np.arange(1, 29, dtype=np.int64)
    run_request(a, 0, prompt)
    other = prompt.copy()
    other[13] = -5          # inside block 3
    assert a.match_prefix(1, other, 28) == 3 * bs
    # Same block contents at a different position is not a hit (the hash is chained).
    shifted = np.concatenate([toks(7, 7, 7, 7), prompt])
    assert a.match_prefix(2, shifted, len(shifted)) == 0
    # After the differing request commits, both branches are cached.
    a.allocate(1, 28)
    a.commit(1, other, 28)
    a.free(1)
    assert a.match_prefix(3, other, 28) == 6 * bs
    check_invariants(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_incremental_commit_matches_one_shot(impl):
    """Committing token by token (decode) registers exactly what one commit would."""
    bs = 4
    a = impl(num_blocks=32, block_size=bs, max_seqs=3, max_blocks_per_seq=8)
    text = np.arange(50, 80, dtype=np.int64)
    a.match_prefix(0, text, 7)
    for n in range(1, 31):
        assert a.allocate(0, n)
        a.commit(0, text, n)
    a.commit(0, text, 12)          # going back is a no-op
    assert a.match_prefix(1, text, 30) == 7 * bs
    assert a.block_tables[1, :7].tolist() == a.block_tables[0, :7].tolist()


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicate_content_keeps_first_mapping(impl):
    """Same prompt computed twice concurrently: the second copy is not cached."""
    bs = 2
    a = impl(num_blocks=12, block_size=bs, max_seqs=3, max_blocks_per_seq=5)
    prompt = np.arange(9, dtype=np.int64)
    for seq in (0, 1):
        assert a.match_prefix(seq, prompt, 9) == 0
        assert a.allocate(seq, 9)
    first, second = a.block_tables[0, :4].tolist(), a.block_tables[1, :4].tolist()
    a.commit(0, prompt, 9)
    a.commit(1, prompt, 9)
    a.free(1)
    assert a.num_cached_blocks == 0   # the second copy went back to the free list
    a.free(0)
    assert a.num_cached_blocks == 4
    assert a.match_prefix(2, prompt, 9) == 4 * bs
    assert a.block_tables[2, :4].tolist() == first and set(first).isdisjoint(second)
    check_invariants(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_eviction_is_lru_and_tail_first(impl):
    bs = 2
    a = impl(num_blocks=6, block_size=bs, max_seqs=2, max_blocks_per_seq=4)
    A, B, C, D = (np.arange(k * 10, k * 10 + 5, dtype=np.int64) for k in range(1, 5))
    for p in (A, B, C):                   # each: 2 full blocks, registered, then cached
        run_request(a, 0, p, 4)
        a.free(0)
    assert a.num_cached_blocks == 6 and a.num_free_blocks == 6
    _, lru = a._check_consistency()
    assert lru == [1, 0, 3, 2, 5, 4]      # freed last block first, oldest request first
    assert a.match_prefix(0, A, 5) == 4   # touching A's blocks makes them most recent
    a.free(0)
    assert a._check_consistency()[1] == [3, 2, 5, 4, 1, 0]
    assert a.allocate(1, 4)               # evicts B (least recently freed), tail block first
    assert a.block_tables[1, :2].tolist() == [3, 2]
    a.commit(1, D, 4)
    a.free(1)
    assert a.match_prefix(0, B, 5) == 0   # evicted
    a.free(0)
    assert a.match_prefix(0, C, 5) == 4 and a.match_prefix(1, A, 5) == 4
    check_invariants(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_colliding_hash_with_other_tokens_is_not_reused(impl):
    """Force every block hash to 0: verification alone must keep contents apart."""
    bs = 4
    a = impl(num_blocks=16, block_size=bs, max_seqs=3, max_blocks_per_seq=4)
    a._hash_mask = 0
    p = np.arange(1, 14, dtype=np.int64)
    run_request(a, 0, p)
    a.free(0)
    q = p.copy()
    q[0] = 99                              # block 0 differs: same (forced) hash, other tokens
    assert a.match_prefix(1, q, 13) == 0
    assert a.prefix_queries == 2 and a.prefix_hits == 0
    a.free(1)
    # With every hash equal, only p's block 0 could be registered (first mapping kept).
    r = np.concatenate([p[:4], p[:4], p[:4], p[:1]])  # repeated block: same hash AND tokens
    assert a.match_prefix(1, r, 13) == 4   # block 0 hits; block 1 is not block 0 again
    assert a.match_prefix(2, p, 13) == 4
    check_invariants(a)


def _child_collision(mask: int, child: np.ndarray):
    """Two first blocks whose hashes differ but whose children (same tokens) collide."""
    a0 = toks(1, 1)
    ha = ref_hash(0, a0) & mask
    for v in range(2, 100_000):
        b0 = toks(v, v)
        hb = ref_hash(0, b0) & mask
        if hb != ha and ref_hash(ha, child) & mask == ref_hash(hb, child) & mask:
            return a0, b0
    raise AssertionError("no collision found")


@pytest.mark.parametrize("impl", IMPLS)
def test_block_under_another_parent_is_not_reused(impl):
    """Same tokens, same position, same (colliding) hash, but another prefix: a miss."""
    mask, child = 0xFF, toks(7, 8)
    a0, b0 = _child_collision(mask, child)
    a = impl(num_blocks=16, block_size=2, max_seqs=3, max_blocks_per_seq=4)
    a._hash_mask = mask
    A, B = np.concatenate([a0, child, [5]]), np.concatenate([b0, child, [5]])
    run_request(a, 0, A)     # registers A0 and A1
    run_request(a, 1, B)     # registers B0; B1's hash is taken by A1 (first mapping kept)
    assert a.match_prefix(2, B, 5) == 2   # B0 hits; A1 is rejected: its parent is A0, not B0
    check_invariants(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_caching_disabled(impl):
    a = impl(num_blocks=8, block_size=2, max_seqs=2, max_blocks_per_seq=4,
             enable_prefix_caching=False)
    p = np.arange(7, dtype=np.int64)
    assert run_request(a, 0, p) == 0
    a.free(0)
    assert a.match_prefix(0, p, 7) == 0
    assert a.num_cached_blocks == 0 and a.prefix_queries == 0 and a.prefix_hits == 0
    check_invariants(a)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_arrays_of_any_layout(impl):
    """Non-contiguous, byte-swapped, unsigned or list inputs behave like the plain array."""
    base = np.arange(100, 113, dtype=np.int64)
    variants = [base, base.astype(np.int32), base.astype(">i4"), base.astype(">i8"),
                base.astype(np.uint16), np.repeat(base, 2)[::2], base.tolist()]
    for v in variants:
        a = impl(num_blocks=16, block_size=4, max_seqs=2, max_blocks_per_seq=4)
        run_request(a, 0, v)
        assert a.match_prefix(1, base, 13) == 12, type(v)


@pytest.mark.parametrize("impl", IMPLS)
def test_ref_counts_view_is_read_only(impl):
    a = impl(num_blocks=4, block_size=2, max_seqs=1, max_blocks_per_seq=2)
    with pytest.raises(ValueError):
        a.ref_counts[0] = 3


# ------------------------------------------------------------------------------------------------
# differential: Cython == reference under random operations
# ------------------------------------------------------------------------------------------------
class Differential:
    """Drives a reference and a Cython allocator with the same calls and compares everything."""

    def __init__(self, num_blocks, block_size, max_seqs, max_blocks, caching, hash_mask=None):
        self.impls = [cls(num_blocks, block_size, max_seqs, max_blocks, caching)
                      for cls in (RefAllocator, CAllocator)]
        if hash_mask is not None:
            for a in self.impls:
                a._hash_mask = hash_mask
        self.bs, self.max_blocks = block_size, max_blocks
        self.tokens = [None] * max_seqs   # the token array a seq's request uses
        self.computed = [0] * max_seqs

    def call(self, method, *args):
        results = []
        for a in self.impls:
            try:
                results.append(("ok", getattr(a, method)(*args)))
            except ValueError:
                results.append(("ValueError", None))
        assert results[0] == results[1], (method, args, results)
        return results[0]

    def match(self, seq, tokens, num_tokens, dtype):
        kind, cached = self.call("match_prefix", seq, tokens.astype(dtype), num_tokens)
        if kind == "ok":
            self.tokens[seq], self.computed[seq] = tokens, cached

    def allocate(self, seq, extra):
        self.call("allocate", seq, self.computed[seq] + extra)

    def commit(self, seq, k, dtype):
        tokens = self.tokens[seq]
        if tokens is None:
            return
        n = min(self.computed[seq] + k, len(tokens))
        kind, _ = self.call("commit", seq, tokens.astype(dtype), n)
        if kind == "ok":
            self.computed[seq] = max(self.computed[seq], n)

    def free(self, seq):
        self.call("free", seq)
        self.tokens[seq], self.computed[seq] = None, 0

    def check(self):
        ref, c = self.impls
        for a in self.impls:
            check_invariants(a)
        check_shared_blocks_are_cached(ref)
        assert snapshot(ref) == snapshot(c)
        assert ref.usage == c.usage
        self.check_block_contents(ref)

    def check_block_contents(self, ref):
        """A registered block in a seq's computed range holds exactly that seq's tokens."""
        for seq, tokens in enumerate(self.tokens):
            if tokens is None:
                continue
            for i in range(min(self.computed[seq] // self.bs, int(ref.num_seq_blocks[seq]))):
                b = int(ref.block_tables[seq, i])
                if ref._registered[b]:
                    np.testing.assert_array_equal(ref._block_tokens[b],
                                                  tokens[i * self.bs:(i + 1) * self.bs])

    def free_all_and_check(self):
        for seq in range(len(self.tokens)):
            self.free(seq)
        self.check()
        for a in self.impls:
            assert a.num_used_blocks == 0 and a.num_free_blocks == a.num_blocks
            assert not a.ref_counts.any() and not a.block_tables.any()


def make_corpus(rng_or_data, length, alphabet, n):
    """Sequences sharing prefixes: a trunk, and branches leaving it at random points.

    The first branch leaves at 0 (an unrelated prompt), so first blocks differ too.
    """
    trunk = [rng_or_data.randrange(alphabet) for _ in range(length)]
    corpus = [np.array(trunk, dtype=np.int64)]
    for j in range(n - 1):
        cut = 0 if j == 0 else rng_or_data.randrange(length + 1)
        tail = [rng_or_data.randrange(alphabet) for _ in range(length - cut)]
        corpus.append(np.array(trunk[:cut] + tail, dtype=np.int64))
    return corpus


class _Rng:
    """random.Random's randrange on top of hypothesis' data.draw, for make_corpus."""

    def __init__(self, draw):
        self.draw = draw

    def randrange(self, n):
        return self.draw(st.integers(0, n - 1))


class AllocatorMachine(RuleBasedStateMachine):
    """Hypothesis state machine: random calls on small pools, so eviction happens often."""
    HASH_MASK = None
    MAX_SEQS = 4

    @initialize(data=st.data(), block_size=st.sampled_from([1, 2, 4]),
                num_blocks=st.integers(3, 20), max_blocks=st.integers(2, 8),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, data, block_size, num_blocks, max_blocks, caching):
        self.d = Differential(num_blocks, block_size, self.MAX_SEQS, max_blocks, caching,
                              self.HASH_MASK)
        length = max_blocks * block_size
        self.corpus = make_corpus(_Rng(data.draw), length, alphabet=3, n=4)

    seqs = st.integers(0, MAX_SEQS - 1)
    dtypes = st.sampled_from([np.int32, np.int64])

    @rule(seq=seqs, text=st.integers(0, 3), cut=st.integers(0, 100), dtype=dtypes,
          misuse=st.integers(0, 9))
    def admit(self, seq, text, cut, dtype, misuse):
        """A new request takes the seq: match its prompt (on a busy seq 1 time in 10)."""
        if misuse:
            self.d.free(seq)
        tokens = self.corpus[text]
        self.d.match(seq, tokens, min(cut, len(tokens)), dtype)

    @rule(seq=seqs, text=st.integers(0, 3), k=st.integers(1, 9), dtype=dtypes)
    def step(self, seq, text, k, dtype):
        """The engine's pattern: blocks for k more tokens, then those tokens computed."""
        if self.d.tokens[seq] is None and not self.d.impls[0].num_seq_blocks[seq]:
            self.d.match(seq, self.corpus[text], len(self.corpus[text]), dtype)
        self.d.allocate(seq, k)
        self.d.commit(seq, k, dtype)

    @rule(seq=seqs, extra=st.integers(0, 9))
    def allocate(self, seq, extra):
        self.d.allocate(seq, extra)

    @rule(seq=seqs, k=st.integers(0, 9), dtype=dtypes)
    def commit(self, seq, k, dtype):
        self.d.commit(seq, k, dtype)

    @rule(seq=seqs)
    def free(self, seq):
        self.d.free(seq)

    @invariant()
    def identical_and_consistent(self):
        if hasattr(self, "d"):
            self.d.check()

    def teardown(self):
        if hasattr(self, "d"):
            self.d.free_all_and_check()


class CollidingBucketsMachine(AllocatorMachine):
    """Distinct hashes but few home buckets: long probe runs, backward-shift deletions."""
    HASH_MASK = 0xFFFFFFFF00000003


class CollidingHashesMachine(AllocatorMachine):
    """3-bit hashes: many equal hashes, only verification keeps contents apart."""
    HASH_MASK = 0x7


_machine_settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = _machine_settings
TestCollidingBucketsMachine = CollidingBucketsMachine.TestCase
TestCollidingBucketsMachine.settings = _machine_settings
TestCollidingHashesMachine = CollidingHashesMachine.TestCase
TestCollidingHashesMachine.settings = _machine_settings


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_differential(seed):
    """Longer seeded runs on a realistic shape: many requests sharing system prompts."""
    rng = random.Random(seed)
    bs, max_seqs, max_blocks = 4, 6, 12
    d = Differential(num_blocks=40, block_size=bs, max_seqs=max_seqs, max_blocks=max_blocks,
                     caching=True)
    corpus = make_corpus(rng, max_blocks * bs, alphabet=50, n=8)
    for step in range(1500):
        seq = rng.randrange(max_seqs)
        op = rng.random()
        if d.tokens[seq] is None:
            d.match(seq, corpus[rng.randrange(8)], rng.randrange(1, max_blocks * bs),
                    rng.choice([np.int32, np.int64]))
        elif op < 0.45:
            d.allocate(seq, rng.randrange(1, 2 * bs))
        elif op < 0.9:
            d.commit(seq, rng.randrange(1, 2 * bs), np.int64)
        else:
            d.free(seq)
        if step % 10 == 0:
            d.check()
    d.free_all_and_check()
    ref = d.impls[0]
    assert ref.prefix_hits > 0 and ref.num_cached_blocks > 0
