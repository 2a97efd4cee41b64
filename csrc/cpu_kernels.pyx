# cython: language_level=3
# distutils: extra_compile_args = -fopenmp
# distutils: extra_link_args = -fopenmp
"""CPU kernels of the forward pass (csrc/cpu_kernels.h), called on torch tensors.

The wrappers take tensors and read their data pointers; they check what a wrong call would turn
into memory corruption (dtype, contiguity of the rows, shapes) and nothing else. Callers in
minivllm/layers/ choose these only on CPU, for float32 and bfloat16, after `supported()`.
"""
from libc.stdint cimport int32_t, int64_t, uint16_t, uintptr_t

import torch

cdef extern from "cpu_kernels.h" nogil:
    int cpu_supports(int need_bf16)
    void linear_f32(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,
                    const float *wp, const float *bias, float *y, int64_t ldy)
    void linear_bf16(int64_t M, int64_t K, int64_t N, const uint16_t *x, int64_t ldx,
                     const uint16_t *wp, const float *bias, void *y, int64_t ldy, int out_f32)
    void rms_norm(int bf16, int64_t T, int64_t H, const void *x, int64_t ldx, void *res,
                  int64_t ldr, const void *weight, void *out, int64_t ldo, float eps)
    void rotary(int bf16, int64_t T, const int64_t *positions, const float *cos_table,
                const float *sin_table, int64_t D, void *q, int64_t ldq, int64_t nq, void *k,
                int64_t ldk, int64_t nk)
    void silu_and_mul(int bf16, int64_t T, int64_t F, const void *gu, int64_t ldgu, void *out,
                      int64_t ldo)
    void paged_attention(int bf16, int64_t B, const int64_t *query_start,
                         const int64_t *seq_lens, const int32_t *block_tables, int64_t bt_stride,
                         int64_t block_size, const int64_t *slot_mapping, const void *q,
                         int64_t ldq, const void *k, const void *v, int64_t ldkv, void *k_cache,
                         void *v_cache, int64_t H, int64_t KVH, int64_t D, float scale, void *out)


def supported(bint bf16=False) -> bool:
    """Whether this CPU runs the kernels (AVX-512; the bf16 linear also needs AVX512-BF16)."""
    return bool(cpu_supports(bf16))


cdef inline uintptr_t _ptr(t):
    return <uintptr_t>t.data_ptr()


cdef inline int64_t _rows(t, int64_t width) except -1:
    """Row stride of a [rows, width] tensor whose rows are contiguous."""
    if t.dim() != 2 or t.shape[1] != width or t.stride(1) != 1:
        raise ValueError(f"expected a [rows, {width}] tensor with contiguous rows, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    return t.stride(0)


def pack_linear_weight(weight):
    """[N, K] weight -> the kernel's panels: fp32 [ceil(N/16), K, 16], bf16 [.., K/2, 16, 2]."""
    n, k = weight.shape
    pad = (-n) % 16
    w = torch.nn.functional.pad(weight.detach(), (0, 0, 0, pad)) if pad else weight.detach()
    panels = (n + pad) // 16
    if weight.dtype == torch.bfloat16:
        if k % 2:
            raise ValueError("the bf16 linear kernel needs an even number of input features")
        return w.reshape(panels, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return w.reshape(panels, 16, k).transpose(1, 2).contiguous()


def linear(x, packed, int64_t out_features, bias=None, out_dtype=None):
    """x [M, K] (rows contiguous) @ W^T (+ bias, float32) -> [M, out_features] in out_dtype
    (default x's; a bf16 x may ask for float32)."""
    cdef int64_t k = packed.shape[1] * (2 if packed.dim() == 4 else 1)
    cdef int64_t ldx = _rows(x, k)
    cdef int64_t m = x.shape[0]
    if x.dtype != packed.dtype:
        raise ValueError(f"dtype mismatch: x {x.dtype}, weight {packed.dtype}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype != x.dtype and out_dtype != torch.float32:
        raise ValueError(f"a {x.dtype} linear cannot write {out_dtype}")
    if bias is not None and (bias.dtype != torch.float32 or bias.stride(0) != 1
                             or bias.shape[0] != out_features):
        raise ValueError("bias must be a contiguous float32 [out_features] tensor")
    out = torch.empty((m, out_features), dtype=out_dtype)
    cdef uintptr_t b = 0 if bias is None else _ptr(bias)
    cdef uintptr_t px = _ptr(x), pw = _ptr(packed), py = _ptr(out)
    cdef int out_f32 = out_dtype == torch.float32
    if x.dtype == torch.bfloat16:
        with nogil:
            linear_bf16(m, k, out_features, <const uint16_t *>px, ldx, <const uint16_t *>pw,
                        <const float *>b, <void *>py, out_features, out_f32)
    elif x.dtype == torch.float32:
        with nogil:
            linear_f32(m, k, out_features, <const float *>px, ldx, <const float *>pw,
                       <const float *>b, <float *>py, out_features)
    else:
        raise ValueError(f"unsupported dtype {x.dtype}")
    return out


cdef inline int _bf16(t) except -1:
    """1 for bfloat16, 0 for float32; anything else is an error."""
    if t.dtype == torch.bfloat16:
        return 1
    if t.dtype == torch.float32:
        return 0
    raise ValueError(f"unsupported dtype {t.dtype}")


cdef inline int _same_dtype(a, b) except -1:
    if a.dtype != b.dtype:
        raise ValueError(f"dtype mismatch: {a.dtype} and {b.dtype}")
    return 0


def rms_norm_(x, residual, weight, double eps):
    """RMSNorm of x [T, H], or of x + residual with the sum stored into residual (in place).
    Returns a new [T, H] tensor."""
    cdef int bf = _bf16(x)
    cdef int64_t h = weight.shape[0], t = x.shape[0]
    cdef int64_t ldx = _rows(x, h), ldr = 0
    cdef uintptr_t pr = 0
    _same_dtype(x, weight)
    if weight.stride(0) != 1:
        raise ValueError("weight must be contiguous")
    if residual is not None:
        _same_dtype(x, residual)
        ldr = _rows(residual, h)
        if residual.shape[0] != t:
            raise ValueError("residual and x differ in rows")
        pr = _ptr(residual)
    out = torch.empty((t, h), dtype=x.dtype)
    cdef uintptr_t px = _ptr(x), pw = _ptr(weight), po = _ptr(out)
    with nogil:
        rms_norm(bf, t, h, <const void *>px, ldx, <void *>pr, ldr, <const void *>pw,
                 <void *>po, h, <float>eps)
    return out


def rotary_(positions, cos, sin, q, k):
    """Rotates q [T, H, D] and k [T, KVH, D] in place (heads contiguous within a token); cos/sin
    are float32 [max_position, D] tables, positions int64 [T]."""
    cdef int bf = _bf16(q)
    cdef int64_t t = q.shape[0], d = q.shape[2]
    _same_dtype(q, k)
    if (q.stride(2) != 1 or q.stride(1) != d or k.stride(2) != 1 or k.stride(1) != d
            or k.shape[2] != d or k.shape[0] != t):
        raise ValueError("q and k need contiguous heads of the same head_dim")
    if (positions.dtype != torch.int64 or positions.shape[0] != t or positions.stride(0) != 1
            or cos.dtype != torch.float32 or not cos.is_contiguous() or cos.shape[1] != d
            or not sin.is_contiguous() or sin.shape != cos.shape or d % 2):
        raise ValueError("positions must be int64 [T]; cos/sin contiguous float32 [P, D], D even")
    cdef uintptr_t pp = _ptr(positions), pc = _ptr(cos), ps = _ptr(sin), pq = _ptr(q), pk = _ptr(k)
    cdef int64_t ldq = q.stride(0), ldk = k.stride(0), nq = q.shape[1], nk = k.shape[1]
    with nogil:
        rotary(bf, t, <const int64_t *>pp, <const float *>pc, <const float *>ps, d,
               <void *>pq, ldq, nq, <void *>pk, ldk, nk)


def silu_and_mul_(gate_up):
    """[T, 2F] (gate | up) -> silu(gate) * up, [T, F]."""
    cdef int bf = _bf16(gate_up)
    cdef int64_t t = gate_up.shape[0], f = gate_up.shape[1] // 2
    cdef int64_t ld = _rows(gate_up, 2 * f)
    out = torch.empty((t, f), dtype=gate_up.dtype)
    cdef uintptr_t pg = _ptr(gate_up), po = _ptr(out)
    with nogil:
        silu_and_mul(bf, t, f, <const void *>pg, ld, <void *>po, f)
    return out


cdef class AttentionPlan:
    """One step's attention metadata, checked once and shared by every layer: query_start [B+1],
    seq_lens [B] and slot_mapping [T] int64, block_tables int32 [B, max_blocks]."""

    cdef object tensors  # keeps the arrays alive while the kernels read them
    cdef int64_t num_seqs, num_tokens, bt_stride, block_size
    cdef uintptr_t query_start, seq_lens, block_tables, slot_mapping

    def __init__(self, query_start, seq_lens, block_tables, slot_mapping, int64_t block_size):
        b = seq_lens.shape[0]
        if (query_start.dtype != torch.int64 or seq_lens.dtype != torch.int64
                or slot_mapping.dtype != torch.int64 or block_tables.dtype != torch.int32
                or not query_start.is_contiguous() or not seq_lens.is_contiguous()
                or not slot_mapping.is_contiguous() or block_tables.stride(1) != 1
                or query_start.shape[0] != b + 1 or block_tables.shape[0] != b
                or slot_mapping.shape[0] != int(query_start[b])):
            raise ValueError("attention metadata has the wrong dtypes, shapes or strides")
        self.tensors = (query_start, seq_lens, block_tables, slot_mapping)
        self.num_seqs, self.num_tokens = b, slot_mapping.shape[0]
        self.bt_stride, self.block_size = block_tables.stride(0), block_size
        self.query_start, self.seq_lens = _ptr(query_start), _ptr(seq_lens)
        self.block_tables, self.slot_mapping = _ptr(block_tables), _ptr(slot_mapping)


def paged_attention_(q, k, v, k_cache, v_cache, AttentionPlan plan, double scale):
    """Writes k/v [T, KVH, D] into the caches [blocks, block_size, KVH, D] at the plan's slots,
    then attends q [T, H, D] causally to each sequence's context; returns [T, H, D]."""
    cdef int bf = _bf16(q)
    cdef int64_t t = q.shape[0], h = q.shape[1], d = q.shape[2], kvh = k.shape[1]
    _same_dtype(q, k)
    _same_dtype(q, v)
    _same_dtype(q, k_cache)
    _same_dtype(q, v_cache)
    if d not in (16, 32, 64, 128, 256) or h % kvh or t != plan.num_tokens:
        raise ValueError(f"head_dim {d} (needs 16, 32, 64, 128 or 256), heads {h}/{kvh}, "
                         f"or {t} tokens for a plan of {plan.num_tokens}")
    if (q.stride(2) != 1 or q.stride(1) != d or k.stride(2) != 1 or k.stride(1) != d
            or v.stride(0) != k.stride(0) or v.stride(1) != d or v.stride(2) != 1
            or k.shape[0] != t or v.shape[0] != t or v.shape[1] != kvh):
        raise ValueError("q, k, v need contiguous heads; k and v the same token stride")
    if (not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or k_cache.shape[1] != plan.block_size or k_cache.shape[2] != kvh
            or k_cache.shape[3] != d or v_cache.shape != k_cache.shape):
        raise ValueError("caches must be contiguous [blocks, block_size, KVH, D]")
    out = torch.empty((t, h, d), dtype=q.dtype)
    cdef uintptr_t pq = _ptr(q), pk = _ptr(k), pv = _ptr(v), pkc = _ptr(k_cache)
    cdef uintptr_t pvc = _ptr(v_cache), po = _ptr(out)
    cdef int64_t ldq = q.stride(0), ldkv = k.stride(0)
    with nogil:
        paged_attention(bf, plan.num_seqs, <const int64_t *>plan.query_start,
                        <const int64_t *>plan.seq_lens, <const int32_t *>plan.block_tables,
                        plan.bt_stride, plan.block_size, <const int64_t *>plan.slot_mapping,
                        <const void *>pq, ldq, <const void *>pk, <const void *>pv, ldkv,
                        <void *>pkc, <void *>pvc, h, kvh, d, <float>scale, <void *>po)
    return out
