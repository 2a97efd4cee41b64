"""Paged KV-cache block allocator with prefix caching (the engine's import point).

The implementation is compiled Cython (csrc/block_allocator.pyx, C interface in
minivllm/_cext/block_allocator.pxd); its readable specification and test oracle is the
pure-Python twin in minivllm/core/block_allocator_ref.py, which has the same API and behaviour.
"""
from minivllm._cext.block_allocator import ROOT_HASH, BlockAllocator, hash_block

__all__ = ["BlockAllocator", "hash_block", "ROOT_HASH"]
