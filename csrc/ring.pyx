# cython: language_level=3
"""Single-producer / single-consumer ring of variable-length records in shared memory.

One process writes, one reads; each holds its own `Ring` over the same segment. A record is
written as a frame (an 8-byte length word, the bytes, padding to 8) at `head`; a record that
would straddle the end of the data area is preceded by a pad frame that sends the reader back to
offset 0, so every record is contiguous and can be decoded in place. The producer never
overwrites: when the ring is full it waits for the consumer, up to a timeout, then raises.

Memory ordering (ring.h): the producer fills the frame, then stores head with release; the
consumer loads head with acquire before reading the frame, and stores tail with release after.
The doorbell handshake (`sleeping`) is documented in ring.h and ipc/PROTOCOL.md.

A busy producer or consumer makes no system call: positions are plain loads and stores, and
the bell is rung only for a consumer that said it is going to sleep.
"""
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

import os

cdef extern from "ring.h" nogil:
    ctypedef struct mv_frame:
        uint32_t length
        uint32_t reserved
    uint32_t MV_RING_MAGIC
    uint32_t MV_RING_VERSION
    uint32_t MV_RING_HEADER_BYTES
    uint32_t MV_FRAME_HEADER_BYTES
    uint32_t MV_FRAME_PAD
    uint64_t mv_load_head(mv_ring_header* h)
    uint64_t mv_load_tail(mv_ring_header* h)
    void mv_store_head(mv_ring_header* h, uint64_t v)
    void mv_store_tail(mv_ring_header* h, uint64_t v)
    int mv_producer_should_ring(mv_ring_header* h)
    int mv_consumer_prepare_sleep(mv_ring_header* h, uint64_t tail)
    void mv_consumer_awake(mv_ring_header* h)
    void mv_cpu_relax()

HEADER_BYTES = MV_RING_HEADER_BYTES


class RingFullError(TimeoutError):
    """The consumer did not make room in time: it is stuck, dead, or far behind."""


class RingCorruptError(ValueError):
    """A frame that cannot be what the producer wrote (see Ring.peek)."""


class RecordTooLargeError(ValueError):
    """A record that can never fit in the ring (or a frame)."""


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint64_t _frame_bytes(size_t n) noexcept nogil:
    return MV_FRAME_HEADER_BYTES + ((n + 7) & ~(<uint64_t>7))


cdef class RecordSink:
    """Where a record codec writes: reserve n contiguous bytes, fill them, commit."""

    cdef char* reserve(self, size_t n, double timeout) except NULL:
        raise NotImplementedError

    cdef int commit(self) except -1:
        raise NotImplementedError


cdef class BytesSink(RecordSink):
    """Builds one record as a bytes object (a ZeroMQ frame)."""

    cdef char* reserve(self, size_t n, double timeout) except NULL:
        self.value = PyBytes_FromStringAndSize(NULL, n)
        return PyBytes_AS_STRING(self.value)

    cdef int commit(self) except -1:
        return 0

    def take(self) -> bytes:
        value, self.value = self.value, None
        return value


cdef class Ring(RecordSink):
    """One side of a ring over a `multiprocessing.shared_memory.SharedMemory` segment.

    `Ring(shm, create=True)` formats a fresh segment (its size is HEADER_BYTES + capacity, the
    capacity a power of two); `Ring(shm)` attaches to a formatted one and checks its header.
    """

    def __cinit__(self, shm, bint create=False):
        cdef unsigned char[::1] view = shm.buf
        cdef uint64_t capacity = len(view) - MV_RING_HEADER_BYTES
        self.shm, self.view, self.name, self.created = shm, view, shm.name, create
        self.hdr = <mv_ring_header*>&view[0]
        self.data = <char*>&view[0] + MV_RING_HEADER_BYTES
        if create:
            if len(view) <= MV_RING_HEADER_BYTES or capacity & (capacity - 1):
                raise ValueError(f"ring {self.name}: capacity {capacity} must be a power of two")
            memset(self.hdr, 0, MV_RING_HEADER_BYTES)
            self.hdr.magic, self.hdr.version = MV_RING_MAGIC, MV_RING_VERSION
            self.hdr.capacity, self.hdr.creator_pid = capacity, os.getpid()
        elif self.hdr.magic != MV_RING_MAGIC or self.hdr.version != MV_RING_VERSION:
            raise ValueError(f"shared-memory segment {self.name} is not a version "
                             f"{MV_RING_VERSION} minivllm ring")
        elif self.hdr.capacity > capacity or self.hdr.capacity & (self.hdr.capacity - 1):
            raise ValueError(f"ring {self.name} claims {self.hdr.capacity} bytes of data: not a "
                             f"power of two within the segment's {capacity}")
        self.capacity = self.hdr.capacity
        self.mask = self.capacity - 1
        self.head = self.head_seen = mv_load_head(self.hdr)
        self.tail = self.tail_seen = mv_load_tail(self.hdr)

    @property
    def capacity(self) -> int:
        return self.capacity

    # ---- producer ------------------------------------------------------------------------
    cdef char* reserve(self, size_t n, double timeout) except NULL:
        """n contiguous bytes at head; waits up to `timeout` s for the consumer to make room."""
        cdef uint64_t need = _frame_bytes(n)
        cdef uint64_t gap
        cdef mv_frame* frame
        if self.hdr == NULL:
            raise ValueError(f"ring {self.name} is closed")
        if need > self.capacity or n > 0xFFFFFFF0u:
            raise RecordTooLargeError(
                f"a record of {n} bytes does not fit ring {self.name}: its largest record is "
                f"{self.capacity - MV_FRAME_HEADER_BYTES} bytes; raise the ring capacity")
        gap = self.capacity - (self.head & self.mask)
        if gap < need:  # would straddle the end: pad to the end, start again at offset 0
            self._wait_room(gap, timeout)
            frame = <mv_frame*>(self.data + (self.head & self.mask))
            frame.length, frame.reserved = MV_FRAME_PAD, 0
            self.head += gap
            mv_store_head(self.hdr, self.head)
        self._wait_room(need, timeout)
        self.pending = need
        frame = <mv_frame*>(self.data + (self.head & self.mask))
        frame.length, frame.reserved = <uint32_t>n, 0
        return <char*>frame + MV_FRAME_HEADER_BYTES

    cdef int _wait_room(self, uint64_t need, double timeout) except -1:
        if self.capacity - (self.head - self.tail_seen) >= need:
            return 0
        cdef double deadline = -1.0
        cdef long pause_ns = 1000
        cdef timespec ts
        cdef int spins = 0
        while True:
            self.tail_seen = mv_load_tail(self.hdr)
            if self.capacity - (self.head - self.tail_seen) >= need:
                return 0
            if spins < 2000 and timeout > 0:  # a consumer mid-read frees room in microseconds
                spins += 1
                mv_cpu_relax()
                continue
            if deadline < 0:
                deadline = _now() + timeout
            elif _now() > deadline:
                raise RingFullError(
                    f"ring {self.name} stayed full for {timeout:g} s ({self.capacity} bytes, "
                    f"{need} needed): its consumer is not reading")
            ts.tv_sec, ts.tv_nsec = 0, pause_ns
            with nogil:
                nanosleep(&ts, NULL)
            pause_ns = min(pause_ns * 2, 1000000)

    cdef int commit(self) except -1:
        """Publish the reserved frame; ring the bell if the consumer sleeps."""
        self.head += self.pending
        self.pending = 0
        mv_store_head(self.hdr, self.head)
        if mv_producer_should_ring(self.hdr):
            self.bells_rung += 1
            if self.bell is not None:
                self.bell()
        return 0

    def write(self, const unsigned char[::1] record, double timeout=5.0) -> None:
        """Copy one record (any bytes) into the ring."""
        cdef size_t n = record.shape[0]
        cdef char* dst = self.reserve(n, timeout)
        if n:
            memcpy(dst, &record[0], n)
        self.commit()

    # ---- consumer ------------------------------------------------------------------------
    cdef const char* peek(self, uint32_t* length) except? NULL:
        """The next record, or NULL when the ring is empty; valid until advance()."""
        cdef uint64_t pos = self.tail
        cdef const char* p = self.peek_at(&pos, length)
        self.frame_len = pos - self.tail
        return p

    cdef const char* peek_at(self, uint64_t* pos, uint32_t* length) except? NULL:
        """The record at position pos[0] (at or past tail, a frame boundary), or NULL when
        nothing is published there; pos[0] moves past it. Nothing is consumed, except a pad
        frame at tail: the producer may be waiting for that room before it writes the record
        behind it. Records stay valid until consume_to() passes them.

        A frame whose length runs past what the producer published (a corrupt or hostile
        producer) is never read. At tail, everything published so far is discarded and
        RingCorruptError raised; the consumer stays inside the segment and reads on. Past tail
        it reads as the end (NULL): the records before it are good, and the next read from tail
        meets it."""
        cdef mv_frame* frame
        cdef uint64_t offset, need, dropped
        while True:
            if pos[0] == self.head_seen:
                self.head_seen = mv_load_head(self.hdr)
                if pos[0] == self.head_seen:
                    return NULL
            offset = pos[0] & self.mask
            frame = <mv_frame*>(self.data + offset)
            if frame.length == MV_FRAME_PAD:
                need = self.capacity - offset
            else:
                need = _frame_bytes(frame.length)
            if need > self.head_seen - pos[0] or offset + need > self.capacity:
                if pos[0] != self.tail:
                    return NULL
                dropped = self.head_seen - self.tail
                self.consume_to(self.head_seen)
                pos[0] = self.tail
                raise RingCorruptError(f"ring {self.name}: a frame's length runs past the "
                                       f"published data; {dropped} bytes discarded")
            if frame.length == MV_FRAME_PAD:
                if pos[0] == self.tail:
                    self.consume_to(self.tail + need)
                pos[0] += need
                continue
            length[0] = frame.length
            pos[0] += need
            return <char*>frame + MV_FRAME_HEADER_BYTES

    cdef void consume_to(self, uint64_t pos):
        """Hand everything before position `pos` back to the producer."""
        self.tail = pos
        mv_store_tail(self.hdr, pos)

    cdef void advance(self):
        self.consume_to(self.tail + self.frame_len)
        self.frame_len = 0

    def read(self):
        """The next record as bytes (a copy), or None when the ring is empty."""
        cdef uint32_t n
        cdef const char* src = self.peek(&n)
        if src == NULL:
            return None
        out = PyBytes_FromStringAndSize(src, n)
        self.advance()
        return out

    def readable(self) -> bool:
        """True when a record is waiting (one shared load at most)."""
        if self.tail != self.head_seen:
            return True
        self.head_seen = mv_load_head(self.hdr)
        return self.tail != self.head_seen

    def spin(self, double seconds) -> bool:
        """Busy-poll for up to `seconds` (without the GIL: other threads of this process run
        meanwhile); True as soon as a record is waiting."""
        if self.hdr == NULL:
            raise ValueError(f"ring {self.name} is closed")
        cdef bint found
        with nogil:
            found = self._spin(seconds)
        return found

    cdef bint _spin(self, double seconds) noexcept nogil:
        cdef double deadline = _now() + seconds
        cdef int i
        while True:
            for i in range(64):
                self.head_seen = mv_load_head(self.hdr)
                if self.tail != self.head_seen:
                    return True
                mv_cpu_relax()
            if _now() >= deadline:
                return False

    def prepare_sleep(self) -> bool:
        """Set `sleeping`; True if the ring is still empty, so the caller may block on its bell.
        False means a record arrived meanwhile: the flag is cleared, read on."""
        return mv_consumer_prepare_sleep(self.hdr, self.tail) == 1

    def awake(self) -> None:
        mv_consumer_awake(self.hdr)

    def used_bytes(self) -> int:
        return mv_load_head(self.hdr) - mv_load_tail(self.hdr)

    def reset(self) -> None:
        """Empty the ring (both sides must be idle: used when a new peer attaches)."""
        self.head = self.head_seen = self.tail = self.tail_seen = 0
        mv_store_head(self.hdr, 0)
        mv_store_tail(self.hdr, 0)
        mv_consumer_awake(self.hdr)

    # ---- lifetime ------------------------------------------------------------------------
    def __dealloc__(self):
        self.view = None  # release our export first, so the segment can close cleanly

    def close(self) -> None:
        """Unmap the segment (and unlink it, on the creating side). Idempotent."""
        if self.shm is None:
            return
        self.hdr, self.data, self.view = NULL, NULL, None
        shm, self.shm = self.shm, None
        shm.close()
        if self.created:  # by path, not shm.unlink(): no resource tracker knows our segments
            try:
                os.unlink("/dev/shm/" + self.name)
            except FileNotFoundError:
                pass

    @property
    def closed(self) -> bool:
        return self.shm is None
