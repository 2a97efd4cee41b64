/* The vector layer on AVX-512 (F/BW/VL/DQ): a vf is one zmm register; tails are masked loads
 * and stores. Included by cpu_kernels.h under its target pragma; names prefixed there. */

/* Rows a linear tile keeps in accumulators: 16 of the 32 zmm registers (the quantized tile
 * also holds its scales and two dequantized weight rows). */
#define VEC_LIN_MR 16
#define VEC_QLIN_MR 16
/* Accumulators of the attention's value tile (GQA heads x head-dimension
 * chunks): 24 of the 32 zmm registers, leaving a value chunk and a broadcast weight. */
#define VEC_ATTN_ACC 24
/* vdpbf16ps for the bf16 linear where the CPU has AVX512-BF16: only the functions marked
 * VEC_DPBF16_TARGET may use it, and the table takes them only on such a CPU. */
#define VEC_DPBF16 1
#define VEC_DPBF16_TARGET __attribute__((target("avx512bf16")))
#define VEC_MASKED_TAILS 1
/* vpdpbusd for the int8 path where the CPU has AVX512-VNNI: only the functions marked
 * VEC_VNNI_TARGET use it, and the table takes them only on such a CPU. */
#define VEC_VNNI 1
#define VEC_VNNI_TARGET __attribute__((target("avx512vnni")))
/* Rows the int8 tile keeps: an int32 and an fp32 accumulator each. */
#define VEC_Q8_MR 12

typedef __m512 vf;

ALWAYS_INLINE vf v_zero(void) { return _mm512_setzero_ps(); }
ALWAYS_INLINE vf v_set1(float x) { return _mm512_set1_ps(x); }
ALWAYS_INLINE vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
ALWAYS_INLINE vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
ALWAYS_INLINE vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
ALWAYS_INLINE vf v_div(vf a, vf b) { return _mm512_div_ps(a, b); }
ALWAYS_INLINE vf v_max(vf a, vf b) { return _mm512_max_ps(a, b); }
ALWAYS_INLINE vf v_min(vf a, vf b) { return _mm512_min_ps(a, b); }
ALWAYS_INLINE vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   /* a*b + c */
ALWAYS_INLINE vf v_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a*b */
ALWAYS_INLINE vf v_loadf(const void *p) { return _mm512_loadu_ps(p); }
ALWAYS_INLINE void v_storef(void *p, vf v) { _mm512_storeu_ps(p, v); }

static inline __mmask16 avx512_tail_mask(int64_t n) {
    return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
}

/* fp32 -> bf16 with round-to-nearest-even and quiet NaNs: bit-identical to torch's cast. */
ALWAYS_INLINE __m256i avx512_to_bf16(vf v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

ALWAYS_INLINE vf avx512_from_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The first min(n, 16) elements (fp32 or bf16) at p; the other lanes 0. */
ALWAYS_INLINE vf v_load(const void *p, int bf16, int64_t n) {
    __mmask16 m = avx512_tail_mask(n);
    return bf16 ? avx512_from_bf16(_mm256_maskz_loadu_epi16(m, p)) : _mm512_maskz_loadu_ps(m, p);
}

ALWAYS_INLINE void v_store(void *p, vf v, int bf16, int64_t n) {
    __mmask16 m = avx512_tail_mask(n);
    if (bf16)
        _mm256_mask_storeu_epi16(p, m, avx512_to_bf16(v));
    else
        _mm512_mask_storeu_ps(p, m, v);
}

/* Rounds to the storage dtype and back: what a torch op in that dtype would have produced. */
ALWAYS_INLINE vf v_round_to(vf v, int bf16) {
    return bf16 ? avx512_from_bf16(avx512_to_bf16(v)) : v;
}

/* v with the lanes from n on set to fill. */
ALWAYS_INLINE vf v_tail(vf v, int64_t n, float fill) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), avx512_tail_mask(n), v);
}

ALWAYS_INLINE float v_hsum(vf v) { return _mm512_reduce_add_ps(v); }
ALWAYS_INLINE float v_hmax(vf v) { return _mm512_reduce_max_ps(v); }

/* The 16 horizontal sums of a[0..15], as one vector: a transpose-and-add tree of 45 shuffles
 * and adds instead of 16 separate reductions (~9 ops each). Decode attention with hot caches
 * (16 sequences of 110 tokens) went from 115 to 75 us a layer in fp32, 102 to 81 in bf16. */
ALWAYS_INLINE vf v_hsum16(const vf *a) {
    __m512 s[8], t[4];
    /* s[i], each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for (a, b) = (a[2i], a[2i+1]) */
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    /* t[i], each 128-bit lane: that lane's sums of keys 4i..4i+3 */
    for (int i = 0; i < 4; i++)
        t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    /* then the four 128-bit lanes: keys 0-3, 4-7, 8-11, 12-15 end in lanes 0, 1, 2, 3 */
    __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44),
                               _mm512_shuffle_f32x4(t[0], t[1], 0xEE));
    __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44),
                               _mm512_shuffle_f32x4(t[2], t[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88),
                         _mm512_shuffle_f32x4(v01, v23, 0xDD));
}

/* Rounds to the nearest integer (ties to even). */
ALWAYS_INLINE vf v_rint(vf x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* y * 2^n for integral n, rounded once: overflow gives inf, underflow denormals or 0. */
ALWAYS_INLINE vf v_scale2(vf y, vf n) { return _mm512_scalef_ps(y, n); }

/* 16 bf16 pairs (w[k], w[k+1]) of the packed panel layout -> w[k] (odd = 0) or w[k+1] in fp32. */
ALWAYS_INLINE vf v_bf16_half(const void *p, const int odd) {
    __m512i u = _mm512_loadu_si512(p);
    return odd ? _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)))
               : _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

/* acc + w[k] * x[k] + w[k+1] * x[k+1] for a bf16 pair of x (one 32-bit broadcast) and 16 pairs
 * of w, by vdpbf16ps (AVX512-BF16). */
ALWAYS_INLINE VEC_DPBF16_TARGET vf avx512_dot_bf16_pairs(vf acc, uint32_t x_pair, __m512bh w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)x_pair), w);
}

/* 16 fp16 -> fp32 (vcvtph2ps, AVX512F). */
ALWAYS_INLINE vf v_load_f16(const void *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(p)); }

/* 16 32-bit lanes of integers: a 64-byte chunk of quantized weights (cpu_quant.h). */
typedef __m512i vq;

ALWAYS_INLINE vq v_loadi(const void *p) { return _mm512_loadu_si512(p); }

/* The 4 bits at bit s of each lane, 0..15, in fp32 (s a constant). */
ALWAYS_INLINE vf v_nibble(vq v, const int s) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, s), _mm512_set1_epi32(15)));
}

/* Byte i of each lane as a signed int8, in fp32 (i a constant). */
ALWAYS_INLINE vf v_sbyte(vq v, const int i) {
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * i), 24));
}
