/* The portable vector layer: a vf is a GCC/Clang generic vector of 16 floats, which the compiler
 * lowers to whatever the target has (4 SSE2 registers on baseline x86-64, 4 NEON registers on
 * arm64); no intrinsics. Tails go through the body's stack buffer. v_fma is a multiply and an
 * add, rounded twice: baseline x86-64 has no FMA, and the module's -ffp-contract=off keeps the
 * compiler from fusing them where the target has one, so the path rounds alike everywhere.
 * Included by cpu_kernels.h with no target pragma; names prefixed there. */

/* Rows a linear tile keeps in accumulators: 4 x 4 of SSE2's 16 xmm registers. */
#define VEC_LIN_MR 4
/* The quantized tile also holds its scales and two dequantized weight rows (16 xmm). */
#define VEC_QLIN_MR 2
/* Accumulators of the attention's value tile (GQA heads x head-dimension
 * chunks): 3 x 4 of SSE2's 16 xmm registers, leaving a value chunk and a broadcast weight. */
#define VEC_ATTN_ACC 3

typedef float vf __attribute__((vector_size(64)));
typedef int32_t portable_vi __attribute__((vector_size(64)));
typedef uint32_t portable_vu __attribute__((vector_size(64)));
typedef uint16_t portable_vh __attribute__((vector_size(32)));

/* a where m is set (all ones), else b */
ALWAYS_INLINE vf portable_select(portable_vi m, vf a, vf b) {
    return (vf)((m & (portable_vi)a) | (~m & (portable_vi)b));
}

ALWAYS_INLINE vf v_zero(void) { return (vf){0}; }
ALWAYS_INLINE vf v_set1(float x) {
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
}
ALWAYS_INLINE vf v_add(vf a, vf b) { return a + b; }
ALWAYS_INLINE vf v_sub(vf a, vf b) { return a - b; }
ALWAYS_INLINE vf v_mul(vf a, vf b) { return a * b; }
ALWAYS_INLINE vf v_div(vf a, vf b) { return a / b; }
ALWAYS_INLINE vf v_max(vf a, vf b) { return portable_select(a > b, a, b); } /* as maxps */
ALWAYS_INLINE vf v_min(vf a, vf b) { return portable_select(a < b, a, b); } /* as minps */
ALWAYS_INLINE vf v_fma(vf a, vf b, vf c) { return a * b + c; }
ALWAYS_INLINE vf v_fnma(vf a, vf b, vf c) { return c - a * b; }
ALWAYS_INLINE vf v_loadf(const void *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
ALWAYS_INLINE void v_storef(void *p, vf v) { memcpy(p, &v, sizeof v); }

/* fp32 -> bf16 (in 32-bit lanes) with round-to-nearest-even and quiet NaNs, as torch. */
ALWAYS_INLINE portable_vu portable_to_bf16(vf v) {
    portable_vu u = (portable_vu)v, nan = (portable_vu)(v != v);
    portable_vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (r & ~nan) | (0x7FC0u & nan);
}

ALWAYS_INLINE vf v_load_full(const void *p, int bf16) {
    if (!bf16) return v_loadf(p);
    portable_vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, portable_vu) << 16);
}

ALWAYS_INLINE void v_store_full(void *p, vf v, int bf16) {
    if (!bf16) {
        v_storef(p, v);
        return;
    }
    portable_vh h = __builtin_convertvector(portable_to_bf16(v), portable_vh);
    memcpy(p, &h, sizeof h);
}

/* Rounds to the storage dtype and back: what a torch op in that dtype would have produced. */
ALWAYS_INLINE vf v_round_to(vf v, int bf16) {
    return bf16 ? (vf)(portable_to_bf16(v) << 16) : v;
}

/* v with the lanes from n on set to fill. */
ALWAYS_INLINE vf v_tail(vf v, int64_t n, float fill) {
    if (n >= 16) return v;
    portable_vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return portable_select(lane < (int32_t)n, v, v_set1(fill));
}

ALWAYS_INLINE float v_hsum(vf v) {
    float s = v[0];
    for (int i = 1; i < 16; i++) s += v[i];
    return s;
}

ALWAYS_INLINE float v_hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < 16; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* The 16 horizontal sums of a[0..15], as one vector. */
ALWAYS_INLINE vf v_hsum16(const vf *a) {
    vf out;
    for (int i = 0; i < 16; i++) out[i] = v_hsum(a[i]);
    return out;
}

/* Rounds to the nearest integer (ties to even) for |x| < 2^22, which v_exp's range is: adding
 * and subtracting 1.5 * 2^23 drops the fraction in the current (nearest-even) rounding mode. */
ALWAYS_INLINE vf v_rint(vf x) {
    vf magic = v_set1(12582912.0f);
    return (x + magic) - magic;
}

/* y * 2^n for integral n in [-150, 129], rounded once as AVX-512's scalef: 2^n as two normal
 * factors 2^(n/2) and 2^(n - n/2), the first product exact for y in [0.5, 2). */
ALWAYS_INLINE vf v_scale2(vf y, vf n) {
    portable_vi e = __builtin_convertvector(n, portable_vi), e1 = e >> 1, e2 = e - e1;
    return y * (vf)((e1 + 127) << 23) * (vf)((e2 + 127) << 23);
}

/* 16 bf16 pairs (w[k], w[k+1]) of the packed panel layout -> w[k] and w[k+1] in fp32. */
ALWAYS_INLINE vf v_bf16_half(const void *p, const int odd) {
    portable_vu u;
    memcpy(&u, p, sizeof u);
    return odd ? (vf)(u & 0xFFFF0000u) : (vf)(u << 16);
}

/* 16 fp16 -> fp32 (cpu_quant.h's scalar conversion: baseline x86-64 has no F16C). */
ALWAYS_INLINE vf v_load_f16(const void *p) {
    uint16_t h[16];
    vf v;
    memcpy(h, p, sizeof h);
    for (int i = 0; i < 16; i++) v[i] = f16_to_f32(h[i]);
    return v;
}

/* 16 32-bit lanes of integers: a 64-byte chunk of quantized weights (cpu_quant.h). */
typedef portable_vu vq;

ALWAYS_INLINE vq v_loadi(const void *p) {
    vq v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The 4 bits at bit s of each lane, 0..15, in fp32 (s a constant). */
ALWAYS_INLINE vf v_nibble(vq v, const int s) {
    return __builtin_convertvector((portable_vi)((v >> s) & 15u), vf); /* signed: cvtdq2ps */
}

/* Byte i of each lane as a signed int8, in fp32 (i a constant). */
ALWAYS_INLINE vf v_sbyte(vq v, const int i) {
    return __builtin_convertvector((portable_vi)(v << (24 - 8 * i)) >> 24, vf);
}
