# cython: language_level=3
"""C-level interface of the shared-memory SPSC ring (see csrc/ring.pyx).

The record codecs (csrc/records.pyx) cimport `Ring` and `RecordSink` to write records straight
into ring memory: `reserve(n)` hands out n contiguous bytes, `commit()` publishes them. A
`RecordSink` is anything with that pair; `BytesSink` builds a bytes object for ZeroMQ frames,
so each record kind has one writer for both channels.
"""
from libc.stdint cimport int32_t, uint32_t, uint64_t


cdef extern from "ring.h" nogil:
    uint32_t MV_FRAME_HEADER_BYTES
    ctypedef struct mv_ring_header:
        uint32_t magic
        uint32_t version
        uint64_t capacity
        int32_t creator_pid


cdef class RecordSink:
    cdef char* reserve(self, size_t n, double timeout) except NULL
    cdef int commit(self) except -1


cdef class BytesSink(RecordSink):
    cdef object value  # the bytes being filled, then the finished record


cdef class Ring(RecordSink):
    cdef mv_ring_header* hdr
    cdef char* data
    cdef uint64_t capacity
    cdef uint64_t mask
    # Each side's own position and its cached view of the other side's, so that the shared
    # cache lines are read only when the cached value says the ring looks full (or empty).
    cdef uint64_t head           # producer: next write position
    cdef uint64_t tail_seen      # producer: last tail read
    cdef uint64_t tail           # consumer: next read position
    cdef uint64_t head_seen      # consumer: last head read
    cdef uint64_t pending        # producer: bytes of the reserved, uncommitted frame
    cdef uint64_t frame_len      # consumer: bytes of the frame handed out by peek()
    cdef object shm
    cdef object view
    cdef readonly str name
    cdef readonly bint created
    cdef public object bell      # called with no argument when the consumer must be woken
    cdef readonly uint64_t bells_rung

    cdef int _wait_room(self, uint64_t need, double timeout) except -1
    cdef const char* peek(self, uint32_t* length) except? NULL
    cdef const char* peek_at(self, uint64_t* pos, uint32_t* length) except? NULL
    cdef void consume_to(self, uint64_t pos)
    cdef bint _spin(self, double seconds) noexcept nogil
    cdef void advance(self)
