# cython: language_level=3
# -Wno-psabi: the portable kernels' 64-byte vectors would pass differently under AVX-512, GCC
# warns; they never cross a call (every vector function is always_inline).
# distutils: extra_compile_args = -fopenmp -ffp-contract=off -Wno-psabi
# distutils: extra_link_args = -fopenmp
# distutils: depends = csrc/cpu_kernels_body.h csrc/cpu_quant.h csrc/cpu_vec_avx512.h csrc/cpu_vec_avx2.h csrc/cpu_vec_portable.h
"""CPU kernels of the forward pass (csrc/cpu_kernels.h), called on torch tensors.

The kernels exist once per ISA (`ISAS`, best first); `CpuKernels(isa)` holds one ISA's and
refuses, with a ValueError, an ISA the CPU lacks (`missing`), so that nothing can execute an
instruction the CPU does not have. The wrappers take tensors and pass their data pointers; they
check what a wrong call would turn into memory corruption (dtypes, strides, shapes, indices) and
nothing else. A trailing `_` marks a function that writes into one of its arguments. Callers in
minivllm/layers/ use these only on CPU, for float32 and bfloat16.

Linear weights are dense (the model's dtype) or GGUF quantization blocks, kept as such and
dequantized in registers (csrc/cpu_quant.h): a weight's `qtype` is ggml's type number, 0 for
dense; QUANT_TYPES names the ones the kernels run. With `act_q8` (where `int8_dot`: AVX-512 with
VNNI) a quantized linear quantizes its inputs to int8 and multiplies in integers, as llama.cpp.
"""
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t

import torch

cdef extern from "cpu_kernels.h" nogil:
    ctypedef struct cpu_kernel_table:
        pass
    ctypedef struct cpu_attention_plan:
        int64_t B, bt_stride, block_size
        const int64_t *query_start
        const int64_t *seq_lens
        const int64_t *slot_mapping
        const int32_t *block_tables
    ctypedef struct cpu_model:
        int64_t layers, hidden, heads, kv_heads, head_dim, inter
        float eps, scale
        const void *embed
        const void *final_norm
        int embed_type
        const int *wtypes
        int act_q8
        const float *cos
        const float *sin
        const void **in_norm
        const void **post_norm
        const void **qkv
        const void **o
        const void **gate_up
        const void **down
        const float **qkv_bias
        void **k_cache
        void **v_cache
    ctypedef struct cpu_buffers:
        void *res
        void *x
        void *h
        void *qkv
        void *attn
        void *gate_up
        void *act
        float *xf
    const char *cpu_isa_missing(int isa)
    int cpu_has_bf16_dot()
    int cpu_has_int8_dot()
    cpu_kernel_table cpu_kernel_table_for(int isa)
    void pack_panels(int64_t N, int64_t K, int esz, const void *w, int64_t ldw, uint32_t *out)
    int64_t q_type_bytes(int qt)
    int64_t q_block_elems(int qt)
    int64_t q_panel_block_bytes(int qt)
    void pack_q_panels(int qt, int64_t N, int64_t K, const uint8_t *w, int64_t ldw, uint8_t *out)
    void attention_plan_init(cpu_attention_plan *a)
    void attention_plan_free(cpu_attention_plan *a)
    void cpu_linear(const cpu_kernel_table *t, int wt, int act_q8, int bf16, int64_t M, int64_t K,
                    int64_t N,
                    const void *x, int64_t ldx, const void *wp, const float *bias, void *y,
                    int64_t ldy, int out_f32)
    void cpu_rms_norm(const cpu_kernel_table *t, int bf16, int64_t T, int64_t H, const void *x,
                      int64_t ldx, void *res, int64_t ldr, const void *weight, void *out,
                      int64_t ldo, float eps)
    int cpu_rotary(const cpu_kernel_table *t, int bf16, int64_t T, const int64_t *positions,
                   int64_t P, const float *cos_table, const float *sin_table, int64_t D, void *q,
                   int64_t ldq, int64_t nq, void *k, int64_t ldk, int64_t nk)
    void cpu_silu_and_mul(const cpu_kernel_table *t, int bf16, int64_t T, int64_t F,
                          const void *gu, int64_t ldgu, void *out, int64_t ldo)
    int cpu_mask_rows(int64_t R, const int64_t *rows, int64_t S, int64_t V, float *logits,
                      int64_t ld, const int32_t *bitmask, int64_t W)
    void cpu_argmax_rows(const cpu_kernel_table *t, int64_t S, int64_t V, const float *logits,
                         int64_t ld, int64_t *out)
    int cpu_paged_attention(const cpu_kernel_table *t, int bf16, const cpu_attention_plan *a,
                            const void *q, int64_t ldq, const void *k, const void *v,
                            int64_t ldkv, void *k_cache, void *v_cache, int64_t num_blocks,
                            int64_t H, int64_t KVH, int64_t D, float scale, void *out)
    int cpu_forward(const cpu_kernel_table *t, int bf16, const cpu_model *m, int64_t vocab,
                    int64_t max_position, int64_t num_blocks, int64_t T, const int64_t *ids,
                    const int64_t *positions, const cpu_attention_plan *a, const cpu_buffers *w,
                    void *out)
    int cpu_num_threads()

cdef extern from "stdlib.h" nogil:
    void *calloc(size_t n, size_t size)
    void free(const void *p)

cdef extern from "sys/mman.h" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_HUGEPAGE

cdef enum:
    HUGE_PAGE = 2 << 20


# The C side's CPU_ISA_* order: best first, as `auto` tries them.
ISAS = ("avx512", "avx2", "portable")


def missing(str isa):
    """What this CPU lacks to run the `isa` kernels, in words; None when it runs them."""
    cdef const char *why = cpu_isa_missing(ISAS.index(isa))
    return None if why == NULL else why.decode()


# ---- helpers -----------------------------------------------------------------------------------

cdef inline uintptr_t _ptr(t):
    return <uintptr_t>t.data_ptr()


cdef inline int64_t _rows(t, int64_t width) except -1:
    """Row stride of a [rows, width] tensor whose rows are contiguous."""
    if t.dim() != 2 or t.shape[1] != width or t.stride(1) != 1:
        raise ValueError(f"expected a [rows, {width}] tensor with contiguous rows, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    return t.stride(0)


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


cdef inline int _heads(t, int64_t tokens, int64_t head_dim) except -1:
    """Checks a [tokens, heads, head_dim] view whose heads are contiguous within a token."""
    if (t.dim() != 3 or t.shape[0] != tokens or t.shape[2] != head_dim or t.stride(2) != 1
            or t.stride(1) != head_dim):
        raise ValueError(f"expected [{tokens}, heads, {head_dim}] with contiguous heads, got "
                         f"shape {tuple(t.shape)} strides {t.stride()}")
    return 0


# ---- linear layers -----------------------------------------------------------------------------

def empty_huge_pages(int64_t nbytes):
    """An uninitialised uint8 buffer that Linux may back with 2 MiB transparent huge pages (THP
    in `madvise` mode, as here): streaming the packed weights then crosses no 4 KiB page
    boundary, where the hardware prefetcher stops, and needs 512x fewer TLB entries. Measured
    on 30 layers of linears: -18% time in bf16, -6 to -9% in fp32."""
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    cdef uintptr_t base = _ptr(buf)
    cdef uintptr_t start = (base + HUGE_PAGE - 1) & ~(<uintptr_t>HUGE_PAGE - 1)
    madvise(<void *>start, nbytes, MADV_HUGEPAGE)  # advice: a refusal only costs speed
    return buf[start - base:start - base + nbytes]


def packed_shape(weight) -> tuple:
    """The kernel's panels for an [N, K] weight: fp32 [ceil(N/16), K, 16], bf16
    [ceil(N/16), K/2, 16, 2] (pairs along K: vdpbf16ps takes them as they are, the other
    paths widen each pair to two fp32 values in registers)."""
    n, k = weight.shape
    if weight.dtype == torch.bfloat16:
        if k % 2:
            raise ValueError("the bf16 linear kernel needs an even number of input features")
        return ((n + 15) // 16, k // 2, 16, 2)
    _bf16(weight)
    return ((n + 15) // 16, k, 16)


def pack_linear_weight(weight, out):
    """Writes an [N, K] weight (rows contiguous) into `out` (packed_shape, same dtype), the
    padding columns zero."""
    cdef int64_t n = weight.shape[0], k = weight.shape[1]
    cdef int64_t ldw = _rows(weight, k)
    if (out.dtype != weight.dtype or tuple(out.shape) != packed_shape(weight)
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {packed_shape(weight)} {weight.dtype} tensor")
    cdef int esz = weight.element_size()
    cdef uintptr_t pw = _ptr(weight), po = _ptr(out)
    with nogil:
        pack_panels(n, k, esz, <const void *>pw, ldw, <uint32_t *>po)
    return out


# ggml's numbers of the quantization types the linear kernels run (csrc/cpu_quant.h).
QUANT_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
BLOCK = 32  # input features per panel block


def quant_packed_shape(int qtype, int64_t n, int64_t k) -> tuple:
    """The kernel's uint8 panels for an [n, k] weight of quantization `qtype` (QUANT_TYPES):
    [ceil(n/16), k/32, 16 blocks' bytes], the file's blocks with 16 rows interleaved."""
    if qtype not in QUANT_TYPES.values():
        raise ValueError(f"no kernel runs ggml type {qtype}; they run {', '.join(QUANT_TYPES)}")
    if k % q_block_elems(qtype):
        raise ValueError(f"a ggml type {qtype} weight needs in_features a multiple of "
                         f"{q_block_elems(qtype)}, got {k}")
    return ((n + 15) // 16, k // BLOCK, q_panel_block_bytes(qtype))


def quant_in_features(int qtype, int64_t row_bytes) -> int:
    """The input features of a weight row of `row_bytes` file bytes of type `qtype`."""
    quant_packed_shape(qtype, 1, 0)  # a type the kernels run
    return row_bytes // q_type_bytes(qtype) * q_block_elems(qtype)


def pack_quant_weight(int qtype, const uint8_t[:, ::1] blocks, int64_t k, out):
    """Writes the file's blocks of an [N, k] weight (a C-contiguous uint8 array [N, k/32 *
    block bytes], e.g. a read-only view of the file) into `out` (a contiguous uint8 tensor of
    quant_packed_shape), the padding rows zero."""
    cdef int64_t n = blocks.shape[0]
    shape = quant_packed_shape(qtype, n, k)
    cdef int64_t row = k // q_block_elems(qtype) * q_type_bytes(qtype)
    if blocks.shape[1] != row:
        raise ValueError(f"blocks of a {k}-feature row take {row} bytes, got {blocks.shape[1]}")
    if out.dtype != torch.uint8 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 {shape} tensor")
    cdef uintptr_t po = _ptr(out)
    with nogil:
        pack_q_panels(qtype, n, k, &blocks[0, 0], blocks.shape[1], <uint8_t *>po)
    return out


cdef int64_t _in_features(packed, int qtype, int bf) except -1:
    """K of a packed weight: dense (packed_shape) or quantized (quant_packed_shape)."""
    if qtype:
        if (packed.dtype != torch.uint8 or packed.dim() != 3
                or qtype not in QUANT_TYPES.values()
                or packed.shape[2] != q_panel_block_bytes(qtype)):
            raise ValueError(f"a ggml type {qtype} weight must be uint8 panels "
                             f"(quant_packed_shape), got {tuple(packed.shape)} {packed.dtype}")
        return packed.shape[1] * BLOCK
    return packed.shape[1] * (2 if bf else 1)


cdef int _int8_path(CpuKernels kernels, bint act_q8, int qtype) except -1:
    if act_q8 and not kernels.int8_dot:
        raise ValueError(f"the int8 path needs AVX-512 kernels on a CPU with AVX512-VNNI, not "
                         f"{kernels.isa} here")
    if act_q8 and not qtype:
        raise ValueError("the int8 path runs quantized weights only")
    return 0


# ---- attention metadata ------------------------------------------------------------------------

cdef class AttentionPlan:
    """One step's attention metadata, checked once and shared by every layer: query_start [B+1],
    seq_lens [B] and slot_mapping [T] int64, block_tables int32 [B, max_blocks]."""

    cdef object tensors  # keeps the arrays alive while the kernels read them
    cdef cpu_attention_plan p
    cdef readonly int64_t num_tokens

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
        self.num_tokens = slot_mapping.shape[0]
        self.p.B, self.p.bt_stride, self.p.block_size = b, block_tables.stride(0), block_size
        self.p.query_start = <const int64_t *><uintptr_t>_ptr(query_start)
        self.p.seq_lens = <const int64_t *><uintptr_t>_ptr(seq_lens)
        self.p.block_tables = <const int32_t *><uintptr_t>_ptr(block_tables)
        self.p.slot_mapping = <const int64_t *><uintptr_t>_ptr(slot_mapping)
        attention_plan_init(&self.p)

    def __dealloc__(self):
        attention_plan_free(&self.p)

    @property
    def block_size(self) -> int:
        return self.p.block_size


# ---- the kernels of one ISA ----------------------------------------------------------------------

cdef class CpuKernels:
    """The kernels of one of ISAS, e.g. CpuKernels("avx2"); a ValueError if this CPU lacks it.
    On AVX-512 the bf16 linear takes vdpbf16ps where the CPU has AVX512-BF16 (`bf16_dot`);
    everywhere else bf16 weights are widened to fp32 in registers."""

    cdef cpu_kernel_table t
    cdef readonly str isa
    cdef readonly bint bf16_dot, int8_dot

    def __init__(self, str isa):
        if isa not in ISAS:
            raise ValueError(f"unknown ISA {isa!r}: one of {', '.join(ISAS)}")
        why = missing(isa)
        if why is not None:
            raise ValueError(f"the {isa} kernels need {why}")
        self.isa = isa
        self.t = cpu_kernel_table_for(ISAS.index(isa))
        self.bf16_dot = isa == "avx512" and cpu_has_bf16_dot()
        self.int8_dot = isa == "avx512" and cpu_has_int8_dot()

    def __repr__(self):
        return f"CpuKernels({self.isa!r})"

    def linear(self, x, packed, int64_t out_features, bias=None, out_dtype=None, out=None,
               int qtype=0, bint act_q8=False):
        """x [M, K] (rows contiguous) @ W^T (+ bias, float32) -> [M, out_features] in out_dtype
        (default x's; a bf16 x may ask for float32), written into `out` where given (a contiguous
        tensor of that shape and dtype). `packed` comes from pack_linear_weight (qtype 0) or
        pack_quant_weight (qtype: its ggml type); act_q8 takes the int8 path."""
        cdef int bf = _bf16(x)
        _int8_path(self, act_q8, qtype)
        cdef int64_t k = _in_features(packed, qtype, bf)
        cdef int64_t ldx = _rows(x, k), m = x.shape[0]
        if not qtype:
            _same_dtype(x, packed)
        if packed.shape[0] * 16 < out_features:
            raise ValueError(f"the packed weight has fewer than {out_features} outputs")
        out_dtype = x.dtype if out_dtype is None else out_dtype
        if out_dtype != x.dtype and out_dtype != torch.float32:
            raise ValueError(f"a {x.dtype} linear cannot write {out_dtype}")
        if bias is not None and (bias.dtype != torch.float32 or bias.stride(0) != 1
                                 or bias.shape[0] != out_features):
            raise ValueError("bias must be a contiguous float32 [out_features] tensor")
        if out is None:
            out = torch.empty((m, out_features), dtype=out_dtype)
        elif (out.dtype != out_dtype or tuple(out.shape) != (m, out_features)
                or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous [{m}, {out_features}] {out_dtype} tensor")
        cdef uintptr_t b = 0 if bias is None else _ptr(bias)
        cdef uintptr_t px = _ptr(x), pw = _ptr(packed), py = _ptr(out)
        cdef int out_f32 = out_dtype == torch.float32
        with nogil:
            cpu_linear(&self.t, qtype, act_q8, bf, m, k, out_features, <const void *>px, ldx, <const void *>pw,
                       <const float *>b, <void *>py, out_features, out_f32)
        return out

    def rms_norm_(self, x, residual, weight, double eps):
        """RMSNorm of x [T, H], or of x + residual with the sum stored into `residual` (in
        place). Returns a new [T, H] tensor."""
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
            cpu_rms_norm(&self.t, bf, t, h, <const void *>px, ldx, <void *>pr, ldr,
                         <const void *>pw, <void *>po, h, <float>eps)
        return out

    def rotary_(self, positions, cos, sin, q, k):
        """Rotates q [T, H, D] and k [T, KVH, D] in place (heads contiguous within a token);
        cos/sin are float32 [max_position, D] tables, positions int64 [T]."""
        cdef int bf = _bf16(q)
        cdef int64_t t = q.shape[0], d = q.shape[2]
        _same_dtype(q, k)
        _heads(q, t, d)
        _heads(k, t, d)
        if (positions.dtype != torch.int64 or positions.shape[0] != t
                or positions.stride(0) != 1 or cos.dtype != torch.float32
                or not cos.is_contiguous() or cos.shape[1] != d or not sin.is_contiguous()
                or sin.shape != cos.shape or sin.dtype != cos.dtype or d % 2):
            raise ValueError("positions must be int64 [T]; cos/sin contiguous float32 [P, D], "
                             "D even")
        cdef uintptr_t pp = _ptr(positions), pc = _ptr(cos), ps = _ptr(sin)
        cdef uintptr_t pq = _ptr(q), pk = _ptr(k)
        cdef int64_t ldq = q.stride(0), ldk = k.stride(0), nq = q.shape[1], nk = k.shape[1]
        cdef int64_t p = cos.shape[0]
        cdef int rc
        with nogil:
            rc = cpu_rotary(&self.t, bf, t, <const int64_t *>pp, p, <const float *>pc,
                            <const float *>ps, d, <void *>pq, ldq, nq, <void *>pk, ldk, nk)
        if rc:
            raise IndexError(f"a position lies outside the rotary tables' [0, {p})")

    def silu_and_mul(self, gate_up):
        """[T, 2F] (gate | up) -> silu(gate) * up, [T, F]."""
        cdef int bf = _bf16(gate_up)
        cdef int64_t t = gate_up.shape[0], f = gate_up.shape[1] // 2
        cdef int64_t ld = _rows(gate_up, 2 * f)
        out = torch.empty((t, f), dtype=gate_up.dtype)
        cdef uintptr_t pg = _ptr(gate_up), po = _ptr(out)
        with nogil:
            cpu_silu_and_mul(&self.t, bf, t, f, <const void *>pg, ld, <void *>po, f)
        return out

    def argmax(self, logits):
        """torch.argmax(logits, dim=-1) of float32 logits [S, V] (rows contiguous): each row's
        first maximum, a NaN counting as the maximum; int64 [S]."""
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.shape[1] < 1:
            raise ValueError(f"logits must be float32 [rows, vocab], got "
                             f"{logits.dtype} {tuple(logits.shape)}")
        cdef int64_t s = logits.shape[0], v = logits.shape[1], ld = _rows(logits, v)
        out = torch.empty(s, dtype=torch.int64)
        cdef uintptr_t pl = _ptr(logits), po = _ptr(out)
        with nogil:
            cpu_argmax_rows(&self.t, s, v, <const float *>pl, ld, <int64_t *>po)
        return out

    def mask_rows_(self, logits, bitmask, rows):
        """Grammar masks, in place: each of `rows` (int64 [R]) of float32 logits [S, V] gets
        -inf where its row of `bitmask` (int32 [S', ceil(V / 32)], xgrammar's layout: bit j of
        word w allows token 32w + j) refuses the token."""
        if logits.dtype != torch.float32 or logits.dim() != 2:
            raise ValueError(f"logits must be float32 [rows, vocab], got "
                             f"{logits.dtype} {tuple(logits.shape)}")
        cdef int64_t s = logits.shape[0], v = logits.shape[1], ld = _rows(logits, v)
        if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or not bitmask.is_contiguous() \
                or bitmask.shape[0] < s or bitmask.shape[1] * 32 < v:
            raise ValueError(f"bitmask must be contiguous int32 [>= {s}, >= {(v + 31) // 32}], "
                             f"got {bitmask.dtype} {tuple(bitmask.shape)}")
        rows = rows.to(torch.int64).contiguous()
        cdef int64_t r = rows.shape[0], w = bitmask.shape[1]
        cdef uintptr_t pl = _ptr(logits), pb = _ptr(bitmask), pr = _ptr(rows)
        cdef int rc
        with nogil:
            rc = cpu_mask_rows(r, <const int64_t *>pr, s, v, <float *>pl, ld,
                               <const int32_t *>pb, w)
        if rc:
            raise IndexError(f"a row lies outside the logits' [0, {s})")

    def paged_attention_(self, q, k, v, k_cache, v_cache, AttentionPlan plan, double scale):
        """Writes k/v [T, KVH, D] into the caches [blocks, block_size, KVH, D] at the plan's
        slots (in place), then attends q [T, H, D] causally to each sequence's context;
        returns a new [T, H, D] tensor."""
        cdef int bf = _bf16(q)
        cdef int64_t t = q.shape[0], h = q.shape[1], d = q.shape[2], kvh = k.shape[1]
        for other in (k, v, k_cache, v_cache):
            _same_dtype(q, other)
        if d not in (16, 32, 64, 128, 256) or h % kvh or t != plan.num_tokens:
            raise ValueError(f"head_dim {d} (needs 16, 32, 64, 128 or 256), heads {h}/{kvh}, "
                             f"or {t} tokens for a plan of {plan.num_tokens}")
        _heads(q, t, d)
        _heads(k, t, d)
        _heads(v, t, d)
        if v.stride(0) != k.stride(0) or v.shape[1] != kvh:
            raise ValueError("k and v need the same heads and token stride")
        if (not k_cache.is_contiguous() or not v_cache.is_contiguous() or k_cache.dim() != 4
                or k_cache.shape[1] != plan.block_size or k_cache.shape[2] != kvh
                or k_cache.shape[3] != d or v_cache.shape != k_cache.shape):
            raise ValueError("caches must be contiguous [blocks, block_size, KVH, D]")
        out = torch.empty((t, h, d), dtype=q.dtype)
        cdef uintptr_t pq = _ptr(q), pk = _ptr(k), pv = _ptr(v), pkc = _ptr(k_cache)
        cdef uintptr_t pvc = _ptr(v_cache), po = _ptr(out)
        cdef int64_t ldq = q.stride(0), ldkv = k.stride(0), num_blocks = k_cache.shape[0]
        cdef int rc
        with nogil:
            rc = cpu_paged_attention(
                &self.t, bf, &plan.p, <const void *>pq, ldq, <const void *>pk, <const void *>pv, ldkv, <void *>pkc,
                <void *>pvc, num_blocks, h, kvh, d, <float>scale, <void *>po)
        if rc:
            raise IndexError("a slot or block index lies outside the KV cache")
        return out


# ---- the whole decoder stack --------------------------------------------------------------------

cdef const void **_pointers(list tensors) except NULL:
    """A malloc'ed array of the tensors' data pointers (None: NULL)."""
    cdef const void **out = <const void **>calloc(max(len(tensors), 1), sizeof(void *))
    if out == NULL:
        raise MemoryError()
    for i, t in enumerate(tensors):
        out[i] = NULL if t is None else <const void *>_ptr(t)
    return out


_LAYER_ARRAYS = ("in_norm", "post_norm", "qkv", "o", "gate_up", "down", "qkv_bias", "k_cache",
                 "v_cache")


cdef class CpuDecoder:
    """A Llama/Qwen2 decoder stack run by one C call a step (csrc: `forward`): every layer's
    kernels in one parallel region, on activations allocated once (grown when a step has more
    tokens than any before). Built from the model's tensors: the embedding [V, hidden], the
    final norm, float32 rotary tables [P, head_dim], and per layer a dict of in_norm, qkv (packed,
    with qkv_bias float32 or None), o, post_norm, gate_up, down (packed), k_cache, v_cache, and
    optionally `types`: {weight name: ggml type} for the linears packed quantized
    (pack_quant_weight). A quantized embedding (embed_type, with `vocab`) is the LM head's
    packed panels, dequantized row by row on lookup. `act_q8`: quantized linears on the int8
    path."""

    cdef CpuKernels kernels
    cdef cpu_model m
    cdef cpu_buffers w
    cdef object tensors, buffers, out
    cdef int bf
    cdef int64_t vocab, max_position, num_blocks, block_size, capacity, nqkv, widest

    def __init__(self, CpuKernels kernels, embed, final_norm, cos, sin, list layers,
                 int64_t heads, int64_t kv_heads, double eps, int embed_type=0,
                 int64_t vocab=0, bint act_q8=False):
        self.kernels, self.bf = kernels, _bf16(final_norm)
        if act_q8 and not kernels.int8_dot:
            _int8_path(kernels, act_q8, 0)
        dtype = final_norm.dtype
        cdef int64_t hidden = final_norm.shape[0], d = cos.shape[1]
        types0 = layers[0].get("types", {})
        inter = _in_features(layers[0]["down"], types0.get("down", 0), self.bf)
        self.nqkv = (heads + 2 * kv_heads) * d
        self.widest = max(hidden, heads * d, inter)
        cache = layers[0]["k_cache"]
        self.vocab = vocab if embed_type else embed.shape[0]
        self.max_position = cos.shape[0]
        self.num_blocks, self.block_size = cache.shape[0], cache.shape[1]
        linears = {"qkv": (self.nqkv, hidden), "o": (hidden, heads * d),
                   "gate_up": (2 * inter, hidden), "down": (hidden, inter)}

        def shape_of(n, k, int qtype):
            return (quant_packed_shape(qtype, n, k) if qtype
                    else packed_shape(torch.empty(n, k, dtype=dtype, device="meta")))

        wtypes = []
        for layer in layers:
            types = layer.get("types", {})
            shapes = {"in_norm": ((hidden,), dtype), "post_norm": ((hidden,), dtype),
                      "k_cache": (tuple(cache.shape), dtype),
                      "v_cache": (tuple(cache.shape), dtype)}
            for name, (n, k) in linears.items():
                qtype = types.get(name, 0)
                shapes[name] = (shape_of(n, k, qtype), torch.uint8 if qtype else dtype)
                wtypes.append(qtype)
            for name, (shape, dt) in shapes.items():
                t = layer[name]
                if t.dtype != dt or tuple(t.shape) != shape or not t.is_contiguous():
                    raise ValueError(f"layer tensor {name}: expected a contiguous {shape} "
                                     f"{dt} tensor, got {tuple(t.shape)} {t.dtype}")
            bias = layer["qkv_bias"]
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()
                                     or tuple(bias.shape) != (self.nqkv,)):
                raise ValueError(f"qkv_bias must be a contiguous float32 [{self.nqkv}] tensor")
        embed_shape = (quant_packed_shape(embed_type, self.vocab, hidden) if embed_type
                       else (self.vocab, hidden))
        if tuple(embed.shape) != embed_shape or embed.dtype != (torch.uint8 if embed_type
                                                                  else dtype):
            raise ValueError(f"the embedding must be {embed_shape} "
                             f"{'uint8' if embed_type else dtype}, got {tuple(embed.shape)}")
        if (d not in (16, 32, 64, 128, 256) or heads % kv_heads or cache.shape[2] != kv_heads
                or cache.shape[3] != d or not embed.is_contiguous()
                or cos.dtype != torch.float32 or sin.shape != cos.shape
                or not cos.is_contiguous() or not sin.is_contiguous()):
            raise ValueError("decoder shapes: head_dim in 16..256, heads a multiple of "
                             "kv_heads, caches [blocks, block_size, kv_heads, head_dim], "
                             "contiguous embedding, norm and float32 rotary tables")
        wtypes_t = torch.tensor(wtypes, dtype=torch.int32)
        self.tensors = (embed, final_norm, cos, sin, layers, wtypes_t)
        self.m.layers, self.m.hidden, self.m.heads, self.m.kv_heads = len(layers), hidden, heads, kv_heads
        self.m.head_dim, self.m.inter, self.m.eps = d, inter, eps
        self.m.scale = <float>(1.0 / (<double>d) ** 0.5)
        self.m.embed, self.m.final_norm = <const void *>_ptr(embed), <const void *>_ptr(final_norm)
        self.m.embed_type, self.m.wtypes = embed_type, <const int *><uintptr_t>_ptr(wtypes_t)
        self.m.act_q8 = act_q8
        self.m.cos, self.m.sin = <const float *>_ptr(cos), <const float *>_ptr(sin)
        # The per-layer pointer arrays, in one allocation (in_norm's: __dealloc__ frees it).
        cdef Py_ssize_t L = len(layers)
        cdef const void **p = _pointers([l[name] for name in _LAYER_ARRAYS for l in layers])
        self.m.in_norm, self.m.post_norm, self.m.qkv = p, p + L, p + 2 * L
        self.m.o, self.m.gate_up, self.m.down = p + 3 * L, p + 4 * L, p + 5 * L
        self.m.qkv_bias = <const float **>(p + 6 * L)
        self.m.k_cache, self.m.v_cache = <void **>(p + 7 * L), <void **>(p + 8 * L)
        self.capacity = 0

    def __dealloc__(self):
        free(self.m.in_norm)

    cdef _grow(self, int64_t tokens):
        """Activations for `tokens` rows (they outlive the step: nothing is allocated while a
        step of at most as many tokens runs)."""
        dtype, hd, f = self.tensors[1].dtype, self.m.hidden, self.m.inter
        widths = {"res": hd, "x": hd, "h": hd, "qkv": self.nqkv,
                  "attn": self.m.heads * self.m.head_dim, "gate_up": 2 * f, "act": f}
        self.buffers = {k: torch.empty(tokens, n, dtype=dtype) for k, n in widths.items()}
        # fp32 inputs of the bf16 linears, or the int8 path's quantized inputs
        self.buffers["xf"] = torch.empty(tokens, self.widest if self.bf or self.m.act_q8 else 1)
        self.out = torch.empty(tokens, hd, dtype=dtype)
        b = self.buffers
        self.w.res, self.w.x, self.w.h = <void *>_ptr(b["res"]), <void *>_ptr(b["x"]), <void *>_ptr(b["h"])
        self.w.qkv, self.w.attn = <void *>_ptr(b["qkv"]), <void *>_ptr(b["attn"])
        self.w.gate_up, self.w.act = <void *>_ptr(b["gate_up"]), <void *>_ptr(b["act"])
        self.w.xf = <float *>_ptr(b["xf"])
        self.capacity = tokens

    def forward(self, input_ids, positions, AttentionPlan plan):
        """Token ids and positions (int64 [T]) -> final hidden states [T, hidden]: a view of a
        buffer the next call overwrites. The step's keys and values go into the caches."""
        cdef int64_t t = input_ids.shape[0]
        if (input_ids.dtype != torch.int64 or positions.dtype != torch.int64
                or not input_ids.is_contiguous() or not positions.is_contiguous()
                or positions.shape[0] != t or plan.num_tokens != t
                or plan.block_size != self.block_size):
            raise ValueError("input_ids and positions must be contiguous int64 [T] for a plan "
                             "of T tokens and the caches' block size")
        if t > self.capacity:
            self._grow(max(t, 2 * self.capacity))
        cdef uintptr_t ids = _ptr(input_ids), pos = _ptr(positions), out = _ptr(self.out)
        cdef int rc
        with nogil:
            rc = cpu_forward(&self.kernels.t, self.bf, &self.m, self.vocab, self.max_position,
                             self.num_blocks, t, <const int64_t *>ids, <const int64_t *>pos,
                             &plan.p, &self.w, <void *>out)
        if rc:
            raise IndexError(("a token id lies outside the vocabulary",
                              "a position lies outside the rotary tables",
                              "a slot or block index lies outside the KV cache")[-rc - 1])
        return self.out[:t]


def num_threads() -> int:
    """The threads the kernels run on: torch's (torch.set_num_threads), one OpenMP runtime."""
    return cpu_num_threads()
