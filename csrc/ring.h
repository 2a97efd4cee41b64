/* Shared-memory SPSC ring: the segment layout and the C11 atomics its protocol needs.
 *
 * The logic lives in ring.pyx; this header holds only what Cython cannot express: the
 * _Atomic fields and explicit memory orders. ipc/PROTOCOL.md ("Rings") documents the layout.
 *
 * Segment: a 256-byte header, then `capacity` bytes of data (a power of two). head and tail
 * count bytes ever written and ever consumed (they never wrap; offsets are pos & (cap - 1)),
 * each on its own cache line so the producer and the consumer do not false-share. The consumer
 * sets `sleeping` before it blocks on its doorbell; the producer reads it after publishing.
 */
#ifndef MINIVLLM_RING_H
#define MINIVLLM_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define MV_RING_MAGIC 0x4752564Du /* the bytes "MVRG" */
#define MV_RING_VERSION 1u
#define MV_RING_HEADER_BYTES 256u
#define MV_FRAME_HEADER_BYTES 8u
#define MV_FRAME_PAD 0xFFFFFFFFu /* frame length marking "skip to the end of the data area" */

typedef struct mv_ring_header {
    uint32_t magic;
    uint32_t version;
    uint64_t capacity;     /* bytes of data after the header */
    int32_t creator_pid;   /* the process that created the segment (stale-segment cleanup) */
    uint32_t reserved;
    char pad0[40];
    _Atomic uint64_t head; /* written by the producer only */
    char pad1[56];
    _Atomic uint64_t tail; /* written by the consumer only */
    char pad2[56];
    _Atomic uint32_t sleeping; /* 1: the consumer is (about to be) blocked on its doorbell */
    char pad3[60];
} mv_ring_header;

/* A frame in the data area: this header, then the record, padded to 8 bytes. */
typedef struct mv_frame {
    uint32_t length; /* record bytes, or MV_FRAME_PAD */
    uint32_t reserved;
} mv_frame;

_Static_assert(sizeof(mv_ring_header) == MV_RING_HEADER_BYTES, "ring header size");
_Static_assert(offsetof(mv_ring_header, head) == 64, "head on its own cache line");
_Static_assert(offsetof(mv_ring_header, tail) == 128, "tail on its own cache line");
_Static_assert(offsetof(mv_ring_header, sleeping) == 192, "sleeping on its own cache line");

static inline uint64_t mv_load_head(mv_ring_header *h) {
    return atomic_load_explicit(&h->head, memory_order_acquire);
}
static inline uint64_t mv_load_tail(mv_ring_header *h) {
    return atomic_load_explicit(&h->tail, memory_order_acquire);
}
/* Release: the frame's bytes are visible before the new head (or tail) is. */
static inline void mv_store_head(mv_ring_header *h, uint64_t v) {
    atomic_store_explicit(&h->head, v, memory_order_release);
}
static inline void mv_store_tail(mv_ring_header *h, uint64_t v) {
    atomic_store_explicit(&h->tail, v, memory_order_release);
}

/* The no-lost-wake-up handshake is the store-buffer pattern: each side stores, then a full
 * fence, then loads what the other side stores. At least one of them sees the other's store:
 * either the consumer sees the new head and does not sleep, or the producer sees `sleeping`. */

/* Producer, after publishing head: 1 if the consumer must be woken (and claims the wake-up, so
 * that a burst of records rings the bell once). */
static inline int mv_producer_should_ring(mv_ring_header *h) {
    atomic_thread_fence(memory_order_seq_cst);
    if (!atomic_load_explicit(&h->sleeping, memory_order_relaxed)) return 0;
    return atomic_exchange_explicit(&h->sleeping, 0, memory_order_acq_rel) == 1;
}

/* Consumer, before blocking: 1 if it may block (the ring is still empty at `tail`). */
static inline int mv_consumer_prepare_sleep(mv_ring_header *h, uint64_t tail) {
    atomic_store_explicit(&h->sleeping, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&h->head, memory_order_relaxed) != tail) {
        atomic_store_explicit(&h->sleeping, 0, memory_order_relaxed);
        return 0;
    }
    return 1;
}

static inline void mv_consumer_awake(mv_ring_header *h) {
    atomic_store_explicit(&h->sleeping, 0, memory_order_relaxed);
}

static inline void mv_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif /* MINIVLLM_RING_H */
