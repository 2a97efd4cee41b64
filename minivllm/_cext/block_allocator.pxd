# cython: language_level=3
"""C-level interface of the paged KV-cache block allocator (see block_allocator.pyx).

A Cython scheduler can `from minivllm._cext.block_allocator cimport BlockAllocator` and call the
`c_*` methods below directly: no Python objects, no GIL. They validate their arguments cheaply
and report misuse through their return value instead of raising:

    c_match_prefix  -> cached tokens (>= 0), or -1 on a bad seq / seq not empty / num_tokens < 0
    c_allocate      -> 1 done, 0 not enough blocks (nothing changed), -1 bad seq / too many blocks
    c_commit        -> 0 done, -1 bad seq / num_tokens beyond the seq's blocks
    c_free          -> 0 done, -1 bad seq

Token pointers (int64 ids, as the scheduler keeps them) must address num_tokens valid ids.
Not thread-safe: nogil lets the caller release the GIL around a batch of calls, but calls on one
allocator must not run concurrently.

This file sits in the package (not csrc/) because Cython finds a module's .pxd by the module's
qualified name, minivllm._cext.block_allocator; csrc/block_allocator.pyx picks it up from here.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


cdef struct AllocState:
    int32_t num_blocks
    int32_t block_size
    int32_t max_seqs
    int32_t max_blocks_per_seq
    bint prefix_caching
    uint64_t hash_mask          # all ones except in tests that force hash collisions

    # Storage of the public numpy arrays (owned by the BlockAllocator object).
    int32_t* tables             # [max_seqs * max_blocks_per_seq], row-major
    int32_t* seq_nblocks        # [max_seqs]
    int32_t* refcnt             # [num_blocks]

    # Per-seq prefix-cache progress.
    int32_t* seq_ncommitted     # blocks of the seq already registered or matched
    uint64_t* seq_last_hash     # chained hash of the last of those blocks

    # Per-block prefix-cache record, valid while registered[b].
    uint8_t* registered
    uint64_t* blk_hash
    uint64_t* blk_parent
    int32_t* blk_pos            # index of the block in its sequence
    int32_t* blk_tokens         # [num_blocks * block_size]

    # Free list: a LIFO stack of block ids.
    int32_t* free_stack
    int32_t n_free

    # Evictable cached blocks (refcount 0, registered): doubly linked list, head = least
    # recently freed. -1 terminates.
    int32_t* lru_prev
    int32_t* lru_next
    int32_t lru_head
    int32_t lru_tail
    int32_t n_cached

    # Prefix cache: open addressing (linear probing, backward-shift deletion), hash -> block.
    uint64_t* ht_keys
    int32_t* ht_vals            # -1 = empty
    uint64_t ht_mask            # capacity - 1, capacity a power of two >= 2 * num_blocks

    int32_t n_used
    int64_t prefix_queries
    int64_t prefix_hits


cdef class BlockAllocator:
    cdef AllocState st
    cdef readonly object block_tables      # np.int32 [max_seqs, max_blocks_per_seq]
    cdef readonly object num_seq_blocks    # np.int32 [max_seqs]
    cdef object _ref_counts                # np.int32 [num_blocks]

    cdef int64_t c_match_prefix(self, int32_t seq, const int64_t* tokens,
                                int64_t num_tokens) noexcept nogil
    cdef int c_allocate(self, int32_t seq, int64_t num_total_tokens) noexcept nogil
    cdef int c_commit(self, int32_t seq, const int64_t* tokens, int64_t num_tokens) noexcept nogil
    cdef int c_free(self, int32_t seq) noexcept nogil
