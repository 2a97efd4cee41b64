/* The vector layer on AVX2 + FMA: a vf is two ymm registers (lanes 0-7, 8-15); tails go through
 * the body's stack buffer (AVX2 has no masked 16-bit loads). Included by cpu_kernels.h under its
 * target pragma; names prefixed there. */

/* Rows a linear tile keeps in accumulators: 6 x 2 of the 16 ymm registers, leaving the weight
 * row and a broadcast input (the usual 6x16 AVX2 micro-kernel). */
#define VEC_LIN_MR 6
/* The quantized tile also holds its scales and two dequantized weight rows (8 ymm). */
#define VEC_QLIN_MR 4
/* Accumulators of the attention's value tile (GQA heads x head-dimension
 * chunks): 6 x 2 of the 16 ymm registers, leaving a value chunk and a broadcast weight. */
#define VEC_ATTN_ACC 6

typedef struct {
    __m256 lo, hi;
} vf;

#define AVX2_MAP(a, b, op) ((vf){op((a).lo, (b).lo), op((a).hi, (b).hi)})

ALWAYS_INLINE vf v_zero(void) { return (vf){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
ALWAYS_INLINE vf v_set1(float x) { return (vf){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
ALWAYS_INLINE vf v_add(vf a, vf b) { return AVX2_MAP(a, b, _mm256_add_ps); }
ALWAYS_INLINE vf v_sub(vf a, vf b) { return AVX2_MAP(a, b, _mm256_sub_ps); }
ALWAYS_INLINE vf v_mul(vf a, vf b) { return AVX2_MAP(a, b, _mm256_mul_ps); }
ALWAYS_INLINE vf v_div(vf a, vf b) { return AVX2_MAP(a, b, _mm256_div_ps); }
ALWAYS_INLINE vf v_max(vf a, vf b) { return AVX2_MAP(a, b, _mm256_max_ps); }
ALWAYS_INLINE vf v_min(vf a, vf b) { return AVX2_MAP(a, b, _mm256_min_ps); }
ALWAYS_INLINE vf v_fma(vf a, vf b, vf c) { /* a*b + c */
    return (vf){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
ALWAYS_INLINE vf v_fnma(vf a, vf b, vf c) { /* c - a*b */
    return (vf){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
ALWAYS_INLINE vf v_loadf(const void *p) {
    return (vf){_mm256_loadu_ps(p), _mm256_loadu_ps((const float *)p + 8)};
}
ALWAYS_INLINE void v_storef(void *p, vf v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps((float *)p + 8, v.hi);
}

ALWAYS_INLINE __m256 avx2_from_bf16(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 lanes fp32 -> bf16 (in 32-bit lanes) with round-to-nearest-even and quiet NaNs, as torch. */
ALWAYS_INLINE __m256i avx2_to_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

ALWAYS_INLINE vf v_load_full(const void *p, int bf16) {
    if (!bf16) return v_loadf(p);
    __m256i h = _mm256_loadu_si256(p);
    return (vf){avx2_from_bf16(_mm256_castsi256_si128(h)),
                avx2_from_bf16(_mm256_extracti128_si256(h, 1))};
}

ALWAYS_INLINE void v_store_full(void *p, vf v, int bf16) {
    if (!bf16) {
        v_storef(p, v);
        return;
    }
    /* packus interleaves 128-bit lanes: [lo0-3 hi0-3 | lo4-7 hi4-7]; the permute restores order */
    __m256i h = _mm256_packus_epi32(avx2_to_bf16(v.lo), avx2_to_bf16(v.hi));
    _mm256_storeu_si256(p, _mm256_permute4x64_epi64(h, 0xD8));
}

/* Rounds to the storage dtype and back: what a torch op in that dtype would have produced. */
ALWAYS_INLINE vf v_round_to(vf v, int bf16) {
    if (!bf16) return v;
    return (vf){_mm256_castsi256_ps(_mm256_slli_epi32(avx2_to_bf16(v.lo), 16)),
                _mm256_castsi256_ps(_mm256_slli_epi32(avx2_to_bf16(v.hi), 16))};
}

/* v with the lanes from n on set to fill. */
ALWAYS_INLINE vf v_tail(vf v, int64_t n, float fill) {
    if (n >= 16) return v;
    __m256i nn = _mm256_set1_epi32((int)n);
    __m256i keep_lo = _mm256_cmpgt_epi32(nn, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i keep_hi = _mm256_cmpgt_epi32(nn, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
    __m256 f = _mm256_set1_ps(fill);
    return (vf){_mm256_blendv_ps(f, v.lo, _mm256_castsi256_ps(keep_lo)),
                _mm256_blendv_ps(f, v.hi, _mm256_castsi256_ps(keep_hi))};
}

ALWAYS_INLINE float avx2_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

ALWAYS_INLINE float v_hsum(vf v) { return avx2_hsum8(_mm256_add_ps(v.lo, v.hi)); }

ALWAYS_INLINE float v_hmax(vf v) {
    __m256 m8 = _mm256_max_ps(v.lo, v.hi);
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* The sums of 8 vectors of 8 lanes, as one vector: two rounds of hadd and a 128-bit swap. */
ALWAYS_INLINE __m256 avx2_hsum8x8(const __m256 *b) {
    __m256 t0 = _mm256_hadd_ps(b[0], b[1]), t1 = _mm256_hadd_ps(b[2], b[3]);
    __m256 t2 = _mm256_hadd_ps(b[4], b[5]), t3 = _mm256_hadd_ps(b[6], b[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* The 16 horizontal sums of a[0..15], as one vector. */
ALWAYS_INLINE vf v_hsum16(const vf *a) {
    __m256 b[16];
    for (int i = 0; i < 16; i++) b[i] = _mm256_add_ps(a[i].lo, a[i].hi);
    return (vf){avx2_hsum8x8(b), avx2_hsum8x8(b + 8)};
}

/* Rounds to the nearest integer (ties to even). */
ALWAYS_INLINE vf v_rint(vf x) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return (vf){_mm256_round_ps(x.lo, mode), _mm256_round_ps(x.hi, mode)};
}

/* y * 2^n for integral n in [-150, 129], rounded once as AVX-512's scalef: 2^n as two normal
 * factors 2^(n/2) and 2^(n - n/2), the first product exact for y in [0.5, 2). */
ALWAYS_INLINE __m256 avx2_scale2(__m256 y, __m256 n) {
    __m256i e = _mm256_cvtps_epi32(n), e1 = _mm256_srai_epi32(e, 1), e2 = _mm256_sub_epi32(e, e1);
    __m256i bias = _mm256_set1_epi32(127);
    __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, bias), 23));
    __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(y, f1), f2);
}

ALWAYS_INLINE vf v_scale2(vf y, vf n) {
    return (vf){avx2_scale2(y.lo, n.lo), avx2_scale2(y.hi, n.hi)};
}

/* 16 bf16 pairs (w[k], w[k+1]) of the packed panel layout -> w[k] (odd = 0) or w[k+1] in fp32. */
ALWAYS_INLINE vf v_bf16_half(const void *p, const int odd) {
    __m256i u0 = _mm256_loadu_si256(p), u1 = _mm256_loadu_si256((const __m256i *)p + 1);
    if (!odd)
        return (vf){_mm256_castsi256_ps(_mm256_slli_epi32(u0, 16)),
                    _mm256_castsi256_ps(_mm256_slli_epi32(u1, 16))};
    __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    return (vf){_mm256_castsi256_ps(_mm256_and_si256(u0, high)),
                _mm256_castsi256_ps(_mm256_and_si256(u1, high))};
}

/* 16 fp16 -> fp32 (F16C). */
ALWAYS_INLINE vf v_load_f16(const void *p) {
    return (vf){_mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1))};
}

/* 16 32-bit lanes of integers: a 64-byte chunk of quantized weights (cpu_quant.h). */
typedef struct {
    __m256i lo, hi;
} vq;

ALWAYS_INLINE vq v_loadi(const void *p) {
    return (vq){_mm256_loadu_si256(p), _mm256_loadu_si256((const __m256i *)p + 1)};
}

ALWAYS_INLINE __m256 avx2_nibble(__m256i v, const int s) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, s), _mm256_set1_epi32(15)));
}

/* The 4 bits at bit s of each lane, 0..15, in fp32 (s a constant). */
ALWAYS_INLINE vf v_nibble(vq v, const int s) {
    return (vf){avx2_nibble(v.lo, s), avx2_nibble(v.hi, s)};
}

ALWAYS_INLINE __m256 avx2_sbyte(__m256i v, const int i) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * i), 24));
}

/* Byte i of each lane as a signed int8, in fp32 (i a constant). */
ALWAYS_INLINE vf v_sbyte(vq v, const int i) {
    return (vf){avx2_sbyte(v.lo, i), avx2_sbyte(v.hi, i)};
}

#undef AVX2_MAP
