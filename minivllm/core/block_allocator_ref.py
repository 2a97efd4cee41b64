"""Paged KV-cache block allocator with prefix caching -- the pure-Python reference.

This module is the readable specification of ``minivllm._cext.block_allocator`` (Cython).
Both implementations must agree bit for bit: same return values, same block tables, same
reference counts, same statistics, for any sequence of calls. The tests run them side by side.

The model
---------
The KV cache is ``num_blocks`` blocks of ``block_size`` token slots each. A sequence lives in an
integer *seq* in ``[0, max_seqs)``; row ``seq`` of ``block_tables`` lists the blocks that hold its
tokens, in order. Every block is in exactly one of three states:

* **used**    -- ``ref_counts[b] > 0``: it sits in that many block-table rows;
* **free**    -- refcount 0, holds nothing reusable; kept on a LIFO free list;
* **cached**  -- refcount 0 but registered in the prefix cache: its tokens may be reused by a
  later request with the same prefix. Kept on an LRU list ordered by the time it was freed; when
  the free list is empty, ``allocate`` evicts from the LRU head (least recently freed).

Prefix caching
--------------
Once all ``block_size`` tokens of a block are computed (``commit``), the block is registered
under its *chained hash* ``hash_block(parent_hash, tokens)``, where ``parent_hash`` is the chained
hash of the block before it (``ROOT_HASH`` for the first block). So a hash names a whole prefix,
not just one block's tokens. ``match_prefix`` walks a new request's full blocks and reuses the
registered blocks it finds, stopping at the first miss.

A 64-bit hash is never trusted alone: a hit also requires the block's stored parent hash,
position in the sequence and token ids to equal the request's. So a collision of two blocks'
hashes costs a cache miss, never wrong KV data; only a collision of two whole prefixes' parent
hashes could still mislead, as in vLLM, whose cache key is (parent hash, token ids). The position
check also guarantees that one block never appears twice in one block table.

When one content is computed twice concurrently (two requests with the same prompt admitted in
the same step), the first block registered keeps the hash; the second stays unregistered and
goes back to the free list when freed.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

__all__ = ["BlockAllocator", "hash_block", "ROOT_HASH"]

# ----------------------------------------------------------------------------------------------
# The block hash: xxHash64's lane round applied to each token id, then its final avalanche.
# All arithmetic is modulo 2**64 (the Cython version uses uint64_t and gets this for free).
# ----------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5

ROOT_HASH = 0  # the "parent hash" of a request's first block


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK64


def hash_block(parent_hash: int, token_ids) -> int:
    """Chained hash of one block: covers the parent's hash and the block's token ids.

    A token id is taken as a signed 64-bit integer reinterpreted as unsigned (so int32 and int64
    arrays holding the same values hash the same).
    """
    h = (parent_hash + _P5) & _MASK64
    for t in np.asarray(token_ids).tolist():
        k = ((int(t) & _MASK64) * _P2) & _MASK64
        k = (_rotl(k, 31) * _P1) & _MASK64
        h ^= k
        h = (_rotl(h, 27) * _P1 + _P4) & _MASK64
    h ^= h >> 33
    h = (h * _P2) & _MASK64
    h ^= h >> 29
    h = (h * _P3) & _MASK64
    h ^= h >> 32
    return h


class BlockAllocator:
    """Reference block allocator. See the module docstring for the model."""

    def __init__(self, num_blocks: int, block_size: int, max_seqs: int, max_blocks_per_seq: int,
                 enable_prefix_caching: bool = True):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size),
                            ("max_seqs", max_seqs), ("max_blocks_per_seq", max_blocks_per_seq)):
            if int(value) <= 0 or int(value) >= 2**31:
                raise ValueError(f"{name} must be in [1, 2**31), got {value}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.max_seqs = int(max_seqs)
        self.max_blocks_per_seq = int(max_blocks_per_seq)
        self.enable_prefix_caching = bool(enable_prefix_caching)

        # Public arrays (the engine hands block_tables to the attention kernels as is).
        self.block_tables = np.zeros((max_seqs, max_blocks_per_seq), dtype=np.int32)
        self.num_seq_blocks = np.zeros(max_seqs, dtype=np.int32)
        self._ref_counts = np.zeros(num_blocks, dtype=np.int32)

        # Per-seq prefix-cache progress: how many of the seq's blocks are already
        # registered (or were matched), and the chained hash of the last of them.
        self._num_committed = [0] * max_seqs
        self._last_hash = [ROOT_HASH] * max_seqs

        # Per-block prefix-cache record (valid while the block is registered).
        self._registered = [False] * num_blocks
        self._block_hash = [0] * num_blocks
        self._block_parent = [0] * num_blocks
        self._block_pos = [0] * num_blocks  # index of the block in its sequence
        self._block_tokens = np.zeros((num_blocks, block_size), dtype=np.int32)

        # Free list: a stack, popped from the end; block 0 comes out first.
        self._free = list(range(num_blocks - 1, -1, -1))
        # Evictable cached blocks, least recently freed first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        # Prefix cache: chained hash -> block id.
        self._cache: dict[int, int] = {}

        self.num_used_blocks = 0
        self.prefix_queries = 0  # KV blocks looked up in the prefix cache
        self.prefix_hits = 0
        # Test hook: AND-ed into every block hash. Setting it to a small value (before first
        # use) forces hash collisions, to exercise the verification path. Not for production.
        self._hash_mask = _MASK64

    # ------------------------------------------------------------------ stats
    @property
    def ref_counts(self) -> np.ndarray:
        view = self._ref_counts.view()
        view.flags.writeable = False
        return view

    @property
    def registered_blocks(self) -> np.ndarray:
        """A fresh bool array: which blocks hold a prefix-cache entry (in use or evictable)."""
        return np.array(self._registered, dtype=np.bool_)

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: the free list plus evictable cached blocks."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._lru)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ------------------------------------------------------------------ operations
    def match_prefix(self, seq: int, token_ids, num_tokens: int) -> int:
        """Attach cached blocks for the longest cached prefix of token_ids[:num_tokens].

        Returns the number of cached tokens (a multiple of block_size, < num_tokens).
        """
        self._check_seq(seq)
        tokens = self._check_tokens(token_ids, num_tokens)
        if self.num_seq_blocks[seq] != 0:
            raise ValueError(f"match_prefix on seq {seq}, which already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        # Leave at least one token to compute: the model must produce logits for the last one.
        max_hits = min((num_tokens - 1) // bs, self.max_blocks_per_seq) if num_tokens > 0 else 0
        parent = ROOT_HASH
        hits = 0
        for i in range(max_hits):
            block_tokens = tokens[i * bs:(i + 1) * bs]
            h = hash_block(parent, block_tokens) & self._hash_mask
            self.prefix_queries += 1
            block = self._cache.get(h)
            if block is None or not self._same_content(block, parent, i, block_tokens):
                break
            self.prefix_hits += 1
            self._attach(seq, block)
            parent = h
            hits += 1
        self._num_committed[seq] = hits
        self._last_hash[seq] = parent
        return hits * bs

    def allocate(self, seq: int, num_total_tokens: int) -> bool:
        """Grow the seq's table to cover num_total_tokens. All or nothing."""
        need = self._checked_need(seq, num_total_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block = self._take_block()
            self._attach(seq, block)
        return True

    def commit(self, seq: int, token_ids, num_tokens: int) -> None:
        """token_ids[:num_tokens] are computed: register the seq's newly full blocks."""
        self._check_seq(seq)
        tokens = self._check_tokens(token_ids, num_tokens)
        n_blocks = int(self.num_seq_blocks[seq])
        if num_tokens > n_blocks * self.block_size:
            raise ValueError(f"commit of {num_tokens} tokens on seq {seq}, "
                             f"which holds only {n_blocks} blocks")
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = self._last_hash[seq]
        for i in range(self._num_committed[seq], num_tokens // bs):
            block_tokens = tokens[i * bs:(i + 1) * bs]
            h = hash_block(parent, block_tokens) & self._hash_mask
            self._register(int(self.block_tables[seq, i]), h, parent, i, block_tokens)
            parent = h
            self._num_committed[seq] = i + 1
        self._last_hash[seq] = parent

    def free(self, seq: int) -> None:
        """Release the seq's blocks, last block first, and reset the seq."""
        self._check_seq(seq)
        n_blocks = int(self.num_seq_blocks[seq])
        # Reverse order: a request's tail blocks reach the LRU first, so they are evicted
        # before its head blocks, which are the ones other requests are likelier to share.
        for i in range(n_blocks - 1, -1, -1):
            self._release(int(self.block_tables[seq, i]))
            self.block_tables[seq, i] = 0
        self.num_seq_blocks[seq] = 0
        self._num_committed[seq] = 0
        self._last_hash[seq] = ROOT_HASH

    # ------------------------------------------------------------------ block moves
    def _attach(self, seq: int, block: int) -> None:
        """Append block to the seq's table and take a reference on it."""
        if self._ref_counts[block] == 0:
            self.num_used_blocks += 1
            self._lru.pop(block, None)  # a cached block in use is no longer evictable
        self._ref_counts[block] += 1
        n = int(self.num_seq_blocks[seq])
        self.block_tables[seq, n] = block
        self.num_seq_blocks[seq] = n + 1

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self.num_used_blocks -= 1
            if self._registered[block]:
                self._lru[block] = None      # most recently freed: evicted last
            else:
                self._free.append(block)

    def _take_block(self) -> int:
        """A block with refcount 0 and no cache entry: from the free list, else evict."""
        if self._free:
            return self._free.pop()
        block, _ = self._lru.popitem(last=False)  # least recently freed
        del self._cache[self._block_hash[block]]
        self._registered[block] = False
        return block

    def _register(self, block: int, h: int, parent: int, pos: int,
                  block_tokens: np.ndarray) -> None:
        if h in self._cache:
            return  # same content already cached in another block: keep the old mapping
        self._cache[h] = block
        self._registered[block] = True
        self._block_hash[block] = h
        self._block_parent[block] = parent
        self._block_pos[block] = pos
        self._block_tokens[block] = block_tokens

    def _same_content(self, block: int, parent: int, pos: int, block_tokens: np.ndarray) -> bool:
        return (self._block_parent[block] == parent and self._block_pos[block] == pos
                and np.array_equal(self._block_tokens[block], block_tokens))

    # ------------------------------------------------------------------ testing aids
    def _check_consistency(self) -> tuple[list[int], list[int]]:
        """Assert the internal structures agree; return (free list, LRU) in order."""
        free, lru = list(self._free), list(self._lru)
        assert len(set(free)) == len(free), "free list holds a block twice"
        for b in range(self.num_blocks):
            zero = self._ref_counts[b] == 0
            assert (b in free) == (zero and not self._registered[b]), f"block {b} free-list state"
            assert (b in self._lru) == (zero and self._registered[b]), f"block {b} LRU state"
            if self._registered[b]:
                assert self._cache[self._block_hash[b]] == b, f"block {b} not under its hash"
        assert len(self._cache) == sum(self._registered), "cache and registered blocks disagree"
        return free, lru

    # ------------------------------------------------------------------ argument checks
    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.max_seqs:
            raise ValueError(f"seq {seq} out of range [0, {self.max_seqs})")

    def _checked_need(self, seq: int, num_total_tokens: int) -> int:
        """Blocks allocate(seq, num_total_tokens) takes (0 if already covered), or raises."""
        self._check_seq(seq)
        if num_total_tokens < 0:
            raise ValueError(f"num_total_tokens must be >= 0, got {num_total_tokens}")
        need = max(0, -(-num_total_tokens // self.block_size) - int(self.num_seq_blocks[seq]))
        if self.num_seq_blocks[seq] + need > self.max_blocks_per_seq:
            raise ValueError(f"{num_total_tokens} tokens exceed max_blocks_per_seq="
                             f"{self.max_blocks_per_seq} blocks of {self.block_size}")
        return need

    @staticmethod
    def _check_tokens(token_ids, num_tokens: int) -> np.ndarray:
        tokens = np.asarray(token_ids)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError("token_ids must be a 1-D integer array")
        if not 0 <= num_tokens <= tokens.shape[0]:
            raise ValueError(f"num_tokens={num_tokens} out of range [0, {tokens.shape[0]}]")
        return tokens
