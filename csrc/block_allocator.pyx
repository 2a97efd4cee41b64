# cython: language_level=3
"""Paged KV-cache block allocator with prefix caching, in C data structures.

The readable specification is minivllm/core/block_allocator_ref.py: this module must behave
exactly like it (same return values, tables, ref counts, stats; the tests check that). Read the
reference first; comments here explain only how the C version gets the same result fast.

Layout: all state lives in one C struct (AllocState, declared in the .pxd) so that the whole
algorithm is plain `nogil` C functions over a struct pointer. The cdef class owns the struct's
memory, exposes the numpy views the engine needs, and wraps the C functions for Python callers.
No Python object is created per block or per token on any path.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef int32_t NIL = -1  # "no block": list terminator, empty hash-table entry

# ------------------------------------------------------------------------------------------------
# Block hash: the same function as block_allocator_ref.hash_block (xxHash64's lane round per
# token id, then its avalanche). uint64_t arithmetic wraps modulo 2**64, as the reference masks.
# ------------------------------------------------------------------------------------------------
cdef uint64_t P1 = 0x9E3779B185EBCA87
cdef uint64_t P2 = 0xC2B2AE3D27D4EB4F
cdef uint64_t P3 = 0x165667B19E3779F9
cdef uint64_t P4 = 0x85EBCA77C2B2AE63
cdef uint64_t P5 = 0x27D4EB2F165667C5
cdef uint64_t ROOT = 0

ROOT_HASH = 0


cdef inline uint64_t rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t hash_tokens(uint64_t parent, const int64_t* tokens, int32_t n) noexcept nogil:
    cdef uint64_t h = parent + P5
    cdef uint64_t k
    cdef int32_t i
    for i in range(n):
        k = <uint64_t>tokens[i] * P2
        k = rotl(k, 31) * P1
        h ^= k
        h = rotl(h, 27) * P1 + P4
    h ^= h >> 33
    h *= P2
    h ^= h >> 29
    h *= P3
    h ^= h >> 32
    return h


def hash_block(uint64_t parent_hash, token_ids):
    """Chained hash of one block (for tests: must equal block_allocator_ref.hash_block)."""
    cdef cnp.ndarray arr = _as_token_array(token_ids)
    return hash_tokens(parent_hash, <const int64_t*>cnp.PyArray_DATA(arr),
                       <int32_t>cnp.PyArray_DIM(arr, 0))


# ------------------------------------------------------------------------------------------------
# Prefix cache: open addressing with linear probing. Load factor <= 1/2 (at most num_blocks keys
# in >= 2*num_blocks entries), so probes are short and the table never grows. Deletion shifts
# later entries of the probe run back instead of leaving tombstones, so lookups never slow down
# with churn.
# ------------------------------------------------------------------------------------------------
cdef inline int64_t ht_index_of(const AllocState* s, uint64_t key) noexcept nogil:
    """Entry index holding key, or -1."""
    cdef uint64_t i = key & s.ht_mask
    while s.ht_vals[i] != NIL:
        if s.ht_keys[i] == key:
            return <int64_t>i
        i = (i + 1) & s.ht_mask
    return -1


cdef inline int32_t ht_find(const AllocState* s, uint64_t key) noexcept nogil:
    cdef int64_t i = ht_index_of(s, key)
    return s.ht_vals[i] if i >= 0 else NIL


cdef inline void ht_insert(AllocState* s, uint64_t key, int32_t block) noexcept nogil:
    """Insert a key known to be absent."""
    cdef uint64_t i = key & s.ht_mask
    while s.ht_vals[i] != NIL:
        i = (i + 1) & s.ht_mask
    s.ht_keys[i] = key
    s.ht_vals[i] = block


cdef inline void ht_erase(AllocState* s, uint64_t key) noexcept nogil:
    """Remove a key known to be present (backward-shift deletion)."""
    cdef uint64_t hole = <uint64_t>ht_index_of(s, key)
    cdef uint64_t j = hole
    cdef uint64_t home
    while True:
        j = (j + 1) & s.ht_mask
        if s.ht_vals[j] == NIL:
            break
        home = s.ht_keys[j] & s.ht_mask
        # Entry j may move into the hole only if the hole lies on its probe path, i.e.
        # cyclically within [home, j): then its lookups still reach it.
        if ((j - home) & s.ht_mask) >= ((j - hole) & s.ht_mask):
            s.ht_keys[hole] = s.ht_keys[j]
            s.ht_vals[hole] = s.ht_vals[j]
            hole = j
    s.ht_vals[hole] = NIL


# ------------------------------------------------------------------------------------------------
# Evictable LRU: a doubly linked list threaded through per-block prev/next arrays, so a cached
# block that gets a prefix hit leaves the list in O(1) from anywhere.
# ------------------------------------------------------------------------------------------------
cdef inline void lru_push_tail(AllocState* s, int32_t b) noexcept nogil:
    s.lru_prev[b] = s.lru_tail
    s.lru_next[b] = NIL
    if s.lru_tail != NIL:
        s.lru_next[s.lru_tail] = b
    else:
        s.lru_head = b
    s.lru_tail = b
    s.n_cached += 1


cdef inline void lru_remove(AllocState* s, int32_t b) noexcept nogil:
    cdef int32_t p = s.lru_prev[b], n = s.lru_next[b]
    if p != NIL:
        s.lru_next[p] = n
    else:
        s.lru_head = n
    if n != NIL:
        s.lru_prev[n] = p
    else:
        s.lru_tail = p
    s.lru_prev[b] = NIL
    s.lru_next[b] = NIL
    s.n_cached -= 1


# ------------------------------------------------------------------------------------------------
# Block moves (reference: _attach, _release, _take_block, _register, _same_content).
# ------------------------------------------------------------------------------------------------
cdef inline void attach(AllocState* s, int32_t seq, int32_t b) noexcept nogil:
    if s.refcnt[b] == 0:
        s.n_used += 1
        if s.registered[b]:
            lru_remove(s, b)  # a cached block in use is no longer evictable
    s.refcnt[b] += 1
    cdef int32_t n = s.seq_nblocks[seq]
    s.tables[<int64_t>seq * s.max_blocks_per_seq + n] = b
    s.seq_nblocks[seq] = n + 1


cdef inline void release(AllocState* s, int32_t b) noexcept nogil:
    s.refcnt[b] -= 1
    if s.refcnt[b] == 0:
        s.n_used -= 1
        if s.registered[b]:
            lru_push_tail(s, b)
        else:
            s.free_stack[s.n_free] = b
            s.n_free += 1


cdef inline int32_t take_block(AllocState* s) noexcept nogil:
    """A block with refcount 0 and no cache entry. Caller checked one is available."""
    if s.n_free > 0:
        s.n_free -= 1
        return s.free_stack[s.n_free]
    cdef int32_t b = s.lru_head
    lru_remove(s, b)
    ht_erase(s, s.blk_hash[b])
    s.registered[b] = 0
    return b


cdef inline void register_block(AllocState* s, int32_t b, uint64_t h, uint64_t parent,
                                int32_t pos, const int64_t* tokens) noexcept nogil:
    if ht_index_of(s, h) >= 0:
        return  # same content already cached in another block: keep the old mapping
    ht_insert(s, h, b)
    s.registered[b] = 1
    s.blk_hash[b] = h
    s.blk_parent[b] = parent
    s.blk_pos[b] = pos
    cdef int32_t* dst = s.blk_tokens + <int64_t>b * s.block_size
    cdef int32_t i
    for i in range(s.block_size):
        dst[i] = <int32_t>tokens[i]


cdef inline bint same_content(const AllocState* s, int32_t b, uint64_t parent, int32_t pos,
                              const int64_t* tokens) noexcept nogil:
    """Verify a hash hit: never trust the 64-bit hash alone."""
    if s.blk_parent[b] != parent or s.blk_pos[b] != pos:
        return False
    cdef const int32_t* stored = s.blk_tokens + <int64_t>b * s.block_size
    cdef int32_t i
    for i in range(s.block_size):
        if stored[i] != tokens[i]:
            return False
    return True


# ------------------------------------------------------------------------------------------------
# Operations (reference: match_prefix, allocate, commit, free). Return codes as in the .pxd.
# ------------------------------------------------------------------------------------------------
cdef inline bint bad_seq(const AllocState* s, int64_t seq) noexcept nogil:
    return seq < 0 or seq >= s.max_seqs


cdef inline int64_t blocks_needed(const AllocState* s, int32_t seq, int64_t n_tokens) noexcept nogil:
    cdef int64_t want = (n_tokens + s.block_size - 1) // s.block_size
    cdef int64_t need = want - s.seq_nblocks[seq]
    return need if need > 0 else 0


cdef int64_t match_prefix_impl(AllocState* s, int32_t seq, const int64_t* tokens,
                               int64_t n_tokens) noexcept nogil:
    if bad_seq(s, seq) or n_tokens < 0 or s.seq_nblocks[seq] != 0:
        return -1
    if not s.prefix_caching or n_tokens == 0:
        return 0
    cdef int32_t bs = s.block_size
    # At least one token stays to compute: the model must produce logits for the last one.
    cdef int64_t max_hits = (n_tokens - 1) // bs
    if max_hits > s.max_blocks_per_seq:
        max_hits = s.max_blocks_per_seq
    cdef uint64_t parent = ROOT, h
    cdef int64_t hits = 0
    cdef int32_t b
    while hits < max_hits:
        h = hash_tokens(parent, tokens + hits * bs, bs) & s.hash_mask
        s.prefix_queries += 1
        b = ht_find(s, h)
        if b == NIL or not same_content(s, b, parent, <int32_t>hits, tokens + hits * bs):
            break
        s.prefix_hits += 1
        attach(s, seq, b)
        parent = h
        hits += 1
    s.seq_ncommitted[seq] = <int32_t>hits
    s.seq_last_hash[seq] = parent
    return hits * bs


cdef int allocate_impl(AllocState* s, int32_t seq, int64_t n_tokens) noexcept nogil:
    if bad_seq(s, seq) or n_tokens < 0:
        return -1
    cdef int64_t need = blocks_needed(s, seq, n_tokens)
    if s.seq_nblocks[seq] + need > s.max_blocks_per_seq:
        return -1
    if need > s.n_free + s.n_cached:
        return 0  # all or nothing: checked before touching anything
    cdef int64_t i
    for i in range(need):
        attach(s, seq, take_block(s))
    return 1


cdef int commit_impl(AllocState* s, int32_t seq, const int64_t* tokens,
                     int64_t n_tokens) noexcept nogil:
    if bad_seq(s, seq) or n_tokens < 0:
        return -1
    cdef int32_t bs = s.block_size
    if n_tokens > <int64_t>s.seq_nblocks[seq] * bs:
        return -1
    if not s.prefix_caching:
        return 0
    # Resume from the seq's last registered block: O(new blocks), not O(sequence).
    cdef uint64_t parent = s.seq_last_hash[seq], h
    cdef int32_t* row = s.tables + <int64_t>seq * s.max_blocks_per_seq
    cdef int32_t full = <int32_t>(n_tokens // bs)
    cdef int32_t i
    for i in range(s.seq_ncommitted[seq], full):
        h = hash_tokens(parent, tokens + <int64_t>i * bs, bs) & s.hash_mask
        register_block(s, row[i], h, parent, i, tokens + <int64_t>i * bs)
        parent = h
    if full > s.seq_ncommitted[seq]:
        s.seq_ncommitted[seq] = full
        s.seq_last_hash[seq] = parent
    return 0


cdef int free_impl(AllocState* s, int32_t seq) noexcept nogil:
    if bad_seq(s, seq):
        return -1
    cdef int32_t* row = s.tables + <int64_t>seq * s.max_blocks_per_seq
    cdef int32_t i
    # Reverse order: tail blocks reach the LRU first and so are evicted first.
    for i in range(s.seq_nblocks[seq] - 1, -1, -1):
        release(s, row[i])
        row[i] = 0
    s.seq_nblocks[seq] = 0
    s.seq_ncommitted[seq] = 0
    s.seq_last_hash[seq] = ROOT
    return 0


# ------------------------------------------------------------------------------------------------
# Python-side argument handling.
# ------------------------------------------------------------------------------------------------
cdef cnp.ndarray _as_token_array(object token_ids):
    """token_ids as a contiguous 1-D int64 array; copies only when it must."""
    cdef cnp.ndarray arr
    if cnp.PyArray_Check(token_ids):
        arr = <cnp.ndarray>token_ids
        # Read in place only if C can: contiguous, aligned, native byte order.
        if (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_ISCARRAY_RO(arr)
                and cnp.PyArray_TYPE(arr) == cnp.NPY_INT64):
            return arr
    arr = np.asarray(token_ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError("token_ids must be a 1-D integer array")
    return np.ascontiguousarray(arr, dtype=np.int64)


cdef int _check_seq(const AllocState* s, Py_ssize_t seq) except -1:
    if bad_seq(s, seq):
        raise ValueError(f"seq {seq} out of range [0, {s.max_seqs})")
    return 0


cdef int _check_allocate(const AllocState* s, Py_ssize_t seq,
                         Py_ssize_t num_total_tokens) except -1:
    """Raise where allocate_impl() would refuse: bad seq, negative or too many tokens."""
    _check_seq(s, seq)
    if num_total_tokens < 0:
        raise ValueError(f"num_total_tokens must be >= 0, got {num_total_tokens}")
    if s.seq_nblocks[seq] + blocks_needed(s, <int32_t>seq, num_total_tokens) \
            > s.max_blocks_per_seq:
        raise ValueError(f"{num_total_tokens} tokens exceed max_blocks_per_seq="
                         f"{s.max_blocks_per_seq} blocks of {s.block_size}")
    return 0


cdef cnp.ndarray _check_tokens(token_ids, Py_ssize_t num_tokens):
    cdef cnp.ndarray arr = _as_token_array(token_ids)
    if not 0 <= num_tokens <= cnp.PyArray_DIM(arr, 0):
        raise ValueError(f"num_tokens={num_tokens} out of range [0, {cnp.PyArray_DIM(arr, 0)}]")
    return arr


cdef _alloc_private_arrays(AllocState* s):
    cdef int64_t nb = s.num_blocks
    cdef uint64_t cap = 1
    while cap < <uint64_t>(2 * nb):
        cap <<= 1
    s.ht_mask = cap - 1
    s.seq_ncommitted = <int32_t*>calloc(s.max_seqs, sizeof(int32_t))
    s.seq_last_hash = <uint64_t*>calloc(s.max_seqs, sizeof(uint64_t))
    s.registered = <uint8_t*>calloc(nb, sizeof(uint8_t))
    s.blk_hash = <uint64_t*>calloc(nb, sizeof(uint64_t))
    s.blk_parent = <uint64_t*>calloc(nb, sizeof(uint64_t))
    s.blk_pos = <int32_t*>calloc(nb, sizeof(int32_t))
    s.blk_tokens = <int32_t*>calloc(nb * s.block_size, sizeof(int32_t))
    s.free_stack = <int32_t*>calloc(nb, sizeof(int32_t))
    s.lru_prev = <int32_t*>calloc(nb, sizeof(int32_t))
    s.lru_next = <int32_t*>calloc(nb, sizeof(int32_t))
    s.ht_keys = <uint64_t*>calloc(cap, sizeof(uint64_t))
    s.ht_vals = <int32_t*>calloc(cap, sizeof(int32_t))
    if (s.seq_ncommitted == NULL or s.seq_last_hash == NULL or s.registered == NULL
            or s.blk_hash == NULL or s.blk_parent == NULL or s.blk_pos == NULL
            or s.blk_tokens == NULL
            or s.free_stack == NULL or s.lru_prev == NULL or s.lru_next == NULL
            or s.ht_keys == NULL or s.ht_vals == NULL):
        raise MemoryError("BlockAllocator: out of memory")


cdef _init_lists(AllocState* s):
    cdef int64_t i
    # Stack popped from the top: block 0 comes out first (as the reference's list.pop()).
    for i in range(s.num_blocks):
        s.free_stack[i] = <int32_t>(s.num_blocks - 1 - i)
        s.lru_prev[i] = NIL
        s.lru_next[i] = NIL
    s.n_free = s.num_blocks
    s.lru_head = NIL
    s.lru_tail = NIL
    for i in range(<int64_t>(s.ht_mask + 1)):
        s.ht_vals[i] = NIL


cdef class BlockAllocator:
    """Paged KV-cache block allocator with prefix caching (API: block_allocator_ref.BlockAllocator)."""

    def __cinit__(self, num_blocks, block_size, max_seqs, max_blocks_per_seq,
                  enable_prefix_caching=True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("max_seqs", max_seqs), ("max_blocks_per_seq", max_blocks_per_seq)):
            if int(value) <= 0 or int(value) >= 2**31:
                raise ValueError(f"{name} must be in [1, 2**31), got {value}")
        cdef AllocState* s = &self.st
        s.num_blocks = num_blocks
        s.block_size = block_size
        s.max_seqs = max_seqs
        s.max_blocks_per_seq = max_blocks_per_seq
        s.prefix_caching = bool(enable_prefix_caching)
        s.hash_mask = <uint64_t>0xFFFFFFFFFFFFFFFF

        self.block_tables = np.zeros((max_seqs, max_blocks_per_seq), dtype=np.int32)
        self.num_seq_blocks = np.zeros(max_seqs, dtype=np.int32)
        self._ref_counts = np.zeros(num_blocks, dtype=np.int32)
        s.tables = <int32_t*>cnp.PyArray_DATA(self.block_tables)
        s.seq_nblocks = <int32_t*>cnp.PyArray_DATA(self.num_seq_blocks)
        s.refcnt = <int32_t*>cnp.PyArray_DATA(self._ref_counts)

        _alloc_private_arrays(s)
        _init_lists(s)

    def __dealloc__(self):
        cdef AllocState* s = &self.st
        free(s.seq_ncommitted); free(s.seq_last_hash); free(s.registered)
        free(s.blk_hash); free(s.blk_parent); free(s.blk_pos); free(s.blk_tokens)
        free(s.free_stack)
        free(s.lru_prev); free(s.lru_next); free(s.ht_keys); free(s.ht_vals)

    # ------------------------------------------------------------------ C API (see .pxd)
    cdef int64_t c_match_prefix(self, int32_t seq, const int64_t* tokens,
                                int64_t num_tokens) noexcept nogil:
        return match_prefix_impl(&self.st, seq, tokens, num_tokens)

    cdef int c_allocate(self, int32_t seq, int64_t num_total_tokens) noexcept nogil:
        return allocate_impl(&self.st, seq, num_total_tokens)

    cdef int c_commit(self, int32_t seq, const int64_t* tokens, int64_t num_tokens) noexcept nogil:
        return commit_impl(&self.st, seq, tokens, num_tokens)

    cdef int c_free(self, int32_t seq) noexcept nogil:
        return free_impl(&self.st, seq)

    # ------------------------------------------------------------------ Python API
    def match_prefix(self, Py_ssize_t seq, token_ids, Py_ssize_t num_tokens):
        _check_seq(&self.st, seq)
        cdef cnp.ndarray arr = _check_tokens(token_ids, num_tokens)
        if self.st.seq_nblocks[seq] != 0:
            raise ValueError(f"match_prefix on seq {seq}, which already holds blocks")
        return match_prefix_impl(&self.st, <int32_t>seq,
                                 <const int64_t*>cnp.PyArray_DATA(arr), num_tokens)

    def allocate(self, Py_ssize_t seq, Py_ssize_t num_total_tokens):
        _check_allocate(&self.st, seq, num_total_tokens)
        return allocate_impl(&self.st, <int32_t>seq, num_total_tokens) == 1

    def commit(self, Py_ssize_t seq, token_ids, Py_ssize_t num_tokens):
        _check_seq(&self.st, seq)
        cdef cnp.ndarray arr = _check_tokens(token_ids, num_tokens)
        if num_tokens > <int64_t>self.st.seq_nblocks[seq] * self.st.block_size:
            raise ValueError(f"commit of {num_tokens} tokens on seq {seq}, "
                             f"which holds only {self.st.seq_nblocks[seq]} blocks")
        commit_impl(&self.st, <int32_t>seq, <const int64_t*>cnp.PyArray_DATA(arr), num_tokens)

    def free(self, Py_ssize_t seq):
        _check_seq(&self.st, seq)
        free_impl(&self.st, <int32_t>seq)

    # ------------------------------------------------------------------ stats
    @property
    def num_blocks(self):
        return self.st.num_blocks

    @property
    def block_size(self):
        return self.st.block_size

    @property
    def max_seqs(self):
        return self.st.max_seqs

    @property
    def max_blocks_per_seq(self):
        return self.st.max_blocks_per_seq

    @property
    def enable_prefix_caching(self):
        return bool(self.st.prefix_caching)

    @property
    def ref_counts(self):
        view = self._ref_counts.view()
        view.flags.writeable = False
        return view

    @property
    def registered_blocks(self):
        """A fresh bool array: which blocks hold a prefix-cache entry (in use or evictable)."""
        return np.array(<uint8_t[:self.st.num_blocks]>self.st.registered, dtype=np.bool_)

    @property
    def num_free_blocks(self):
        return self.st.n_free + self.st.n_cached

    @property
    def num_used_blocks(self):
        return self.st.n_used

    @property
    def num_cached_blocks(self):
        return self.st.n_cached

    @property
    def usage(self):
        return self.st.n_used / <double>self.st.num_blocks

    @property
    def prefix_queries(self):
        return self.st.prefix_queries

    @property
    def prefix_hits(self):
        return self.st.prefix_hits

    # ------------------------------------------------------------------ testing aids
    @property
    def _hash_mask(self):
        """AND-ed into every block hash; tests shrink it (before first use) to force collisions."""
        return self.st.hash_mask

    @_hash_mask.setter
    def _hash_mask(self, uint64_t mask):
        self.st.hash_mask = mask

    def _check_consistency(self):
        """Assert the C structures agree with each other; return (free list, LRU) in order.

        Tests call this after every step and compare the lists with the reference's.
        """
        cdef AllocState* s = &self.st
        cdef int64_t b, i, n, home, occupied = 0, registered = 0
        free_list = [s.free_stack[i] for i in range(s.n_free)]
        on_free = set(free_list)
        assert len(on_free) == s.n_free, "free list holds a block twice"
        lru = []
        b = s.lru_head
        while b != NIL:
            assert s.lru_next[b] == NIL or s.lru_prev[s.lru_next[b]] == b, "LRU links broken"
            lru.append(b)
            assert len(lru) <= s.num_blocks, "LRU cycle"
            b = s.lru_next[b]
        assert len(lru) == s.n_cached and (not lru or lru[len(lru) - 1] == s.lru_tail), "LRU count/tail"
        for b in range(s.num_blocks):
            zero = s.refcnt[b] == 0
            assert (b in on_free) == (zero and not s.registered[b]), f"block {b} free-list state"
            assert (b in lru) == (zero and s.registered[b]), f"block {b} LRU state"
            if s.registered[b]:
                registered += 1
                assert ht_find(s, s.blk_hash[b]) == b, f"block {b} not found under its hash"
        for i in range(<int64_t>s.ht_mask + 1):
            if s.ht_vals[i] == NIL:
                continue
            occupied += 1
            assert s.registered[s.ht_vals[i]] and s.blk_hash[s.ht_vals[i]] == s.ht_keys[i]
            # Linear-probing invariant: no empty entry between an entry and its home.
            home = s.ht_keys[i] & s.ht_mask
            n = home
            while n != i:
                assert s.ht_vals[n] != NIL, "probe run broken by an empty entry"
                n = (n + 1) & s.ht_mask
        assert occupied == registered, "hash table and registered blocks disagree"
        return free_list, lru
