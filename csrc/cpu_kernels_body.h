/* The CPU kernels, written once against the vector layer: `vf` (16 fp32 lanes) and its `v_*`
 * ops, fp32 or bf16 in memory and fp32 in registers. cpu_kernels.h includes this once per ISA,
 * after that ISA's layer and with ISA defined: every name here is prefixed there (ISA_NAME), so
 * there is no include guard on purpose. A layer defines VEC_LIN_MR (rows a linear tile keeps in
 * registers), VEC_DPBF16 where it has vdpbf16ps, and VEC_MASKED_TAILS where it has v_load /
 * v_store of its own; otherwise the buffered tails below build them on v_load_full /
 * v_store_full. */

#ifndef VEC_DPBF16
#define VEC_DPBF16 0
#endif
#ifndef VEC_VNNI
#define VEC_VNNI 0
#endif

#ifndef VEC_MASKED_TAILS
/* Tails through a 64-byte stack buffer: the ISA has no masked loads of 16-bit elements. */
ALWAYS_INLINE vf v_load(const void *p, int bf16, int64_t n) {
    if (n >= 16) return v_load_full(p, bf16);
    uint32_t buf[16] = {0};
    memcpy(buf, p, n * (bf16 ? 2 : 4));
    return v_load_full(buf, bf16);
}

ALWAYS_INLINE void v_store(void *p, vf v, int bf16, int64_t n) {
    if (n >= 16) {
        v_store_full(p, v, bf16);
        return;
    }
    uint32_t buf[16];
    v_store_full(buf, v, bf16);
    memcpy(p, buf, n * (bf16 ? 2 : 4));
}
#endif

/* ---- linear layers: y[M, N] = x[M, K] @ W^T + bias, W prepacked in 16-column panels ---------
 *
 * fp32 panels are [K][16]: one 64-byte row of 16 output columns per input index, so a panel
 * streams sequentially and the inner loop is one weight load and up to VEC_LIN_MR FMAs with the
 * input broadcast. bf16 panels are [K/2][16][2]: a 64-byte row holds the 16 columns of two input
 * indices, which v_bf16_half widens to fp32 in registers (a shift or a mask), or which vdpbf16ps
 * multiplies by a broadcast pair of inputs where the CPU has AVX512-BF16 (linear_dp). bf16
 * inputs are widened to an fp32 copy once per call. Threads split the panels; each thread's
 * panels are contiguous in memory. Rows go in chunks of VEC_LIN_MR (one accumulator each).
 */

ALWAYS_INLINE void lin_store(int mr, vf *acc, void *y, int64_t ldy, int out_bf16, int64_t m0,
                             int64_t n0, int64_t N, const float *bias) {
    vf b = bias ? v_load(bias + n0, 0, N - n0) : v_zero();
    for (int r = 0; r < mr; r++)
        v_store(ELEM(y, out_bf16, (m0 + r) * ldy + n0), v_add(acc[r], b), out_bf16, N - n0);
}

/* A weight line LIN_PF ahead into L2, or into L1 for a tile of one or two rows: its few
 * FMAs per line do not hide an L2 hit (AVX2 bf16, batch 1, 1 thread: 75 -> 85 tok/s; at batch
 * 16 L2 is 5% faster). */
ALWAYS_INLINE void lin_prefetch(int mr, const char *p) {
    if (mr <= 2)
        __builtin_prefetch(p, 0, 3);
    else
        __builtin_prefetch(p, 0, LIN_PF_LOCALITY);
}

/* Rows m0..m0+mr of fp32 x against one panel of fp32 (w_bf16 = 0) or bf16 weights. */
ALWAYS_INLINE void lin_tile(int mr, const float *x, int64_t ldx, const void *w, int w_bf16,
                            int64_t K, void *y, int64_t ldy, int out_bf16, int64_t m0,
                            int64_t n0, int64_t N, const float *bias) {
    vf acc[VEC_LIN_MR];
    x += m0 * ldx;
    for (int r = 0; r < mr; r++) acc[r] = v_zero();
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
        const char *wk = (const char *)w + k * (w_bf16 ? 32 : 64);
        lin_prefetch(mr, wk + LIN_PF);
        if (!w_bf16) lin_prefetch(mr, wk + 64 + LIN_PF);
        /* k, then k + 1: one weight row live at a time leaves AVX2 a register for the input
         * (bf16 M = 16 on AVX2: 81 -> 107 GFLOPS; fp32's second load is hoisted anyway) */
        vf w0 = w_bf16 ? v_bf16_half(wk, 0) : v_loadf(wk);
        for (int r = 0; r < mr; r++) acc[r] = v_fma(v_set1(x[r * ldx + k]), w0, acc[r]);
        vf w1 = w_bf16 ? v_bf16_half(wk, 1) : v_loadf(wk + 64);
        for (int r = 0; r < mr; r++) acc[r] = v_fma(v_set1(x[r * ldx + k + 1]), w1, acc[r]);
    }
    if (k < K) /* odd K, fp32 only (bf16 packing needs K even) */
        for (int r = 0; r < mr; r++)
            acc[r] = v_fma(v_set1(x[r * ldx + k]), v_loadf((const float *)w + k * 16), acc[r]);
    lin_store(mr, acc, y, ldy, out_bf16, m0, n0, N, bias);
}

/* One panel for rows [0, M): full chunks of MR rows, then the tail with its exact row count
 * (the switch makes `mr` a constant in each copy, so the accumulators stay in registers; the
 * cases at or above MR are compiled out). */
#define LIN_CASE(MR, R, TILE, ...) \
    case R: if (R < MR) TILE(R, __VA_ARGS__, m0, n0, N, bias); break;
#define LIN_PANEL(MR, TILE, M, ...)                                                  \
    do {                                                                             \
        int64_t m0 = 0;                                                              \
        for (; m0 + MR <= (M); m0 += MR)                                             \
            TILE(MR, __VA_ARGS__, m0, n0, N, bias);                                  \
        switch ((int)((M) - m0)) {                                                   \
            LIN_CASE(MR, 1, TILE, __VA_ARGS__) LIN_CASE(MR, 2, TILE, __VA_ARGS__)    \
            LIN_CASE(MR, 3, TILE, __VA_ARGS__) LIN_CASE(MR, 4, TILE, __VA_ARGS__)    \
            LIN_CASE(MR, 5, TILE, __VA_ARGS__) LIN_CASE(MR, 6, TILE, __VA_ARGS__)    \
            LIN_CASE(MR, 7, TILE, __VA_ARGS__) LIN_CASE(MR, 8, TILE, __VA_ARGS__)    \
            LIN_CASE(MR, 9, TILE, __VA_ARGS__) LIN_CASE(MR, 10, TILE, __VA_ARGS__)   \
            LIN_CASE(MR, 11, TILE, __VA_ARGS__) LIN_CASE(MR, 12, TILE, __VA_ARGS__)  \
            LIN_CASE(MR, 13, TILE, __VA_ARGS__) LIN_CASE(MR, 14, TILE, __VA_ARGS__)  \
            LIN_CASE(MR, 15, TILE, __VA_ARGS__)                                      \
        default: break;                                                              \
        }                                                                            \
    } while (0)

/* Quantized weights (cpu_quant.h's panels of GGUF blocks), dequantized in registers as the
 * oracle (gguf.quants) does, bit for bit: d * (q - 8), d * q + m (Q4_1, Q4_K), d * q (Q8_0,
 * Q6_K with a scale for each 16 features). qt is a constant in each copy (qlinear's switch). */
ALWAYS_INLINE void qlin_tile(int mr, const int qt, const float *x, int64_t ldx, const uint8_t *w,
                             int64_t K, void *y, int64_t ldy, int out_bf16, int64_t m0,
                             int64_t n0, int64_t N, const float *bias) {
    vf acc[VEC_QLIN_MR];
    const int64_t pb = q_panel_block_bytes(qt);
    x += m0 * ldx;
    for (int r = 0; r < mr; r++) acc[r] = v_zero();
    for (int64_t k0 = 0; k0 < K; k0 += Q_BLOCK, w += pb) {
        for (int64_t c = 0; c < pb; c += 64) __builtin_prefetch(w + c + LIN_PF, 0, LIN_PF_LOCALITY);
        const uint8_t *qs = w + q_quants_offset(qt);
        const float *xk = x + k0;
        vf d = qt == QT_Q4_K || qt == QT_Q6_K ? v_loadf(w) : v_load_f16(w);
        if (qt == QT_Q8_0 || qt == QT_Q6_K) {
            vf d1 = qt == QT_Q6_K ? v_loadf(w + 64) : d; /* Q6_K: features 16-31's scale */
            for (int g = 0; g < Q_BLOCK / 4; g++) {
                vq c = v_loadi(qs + g * 64);
                for (int i = 0; i < 4; i++) {
                    vf wj = v_mul(v_sbyte(c, i), g < 4 ? d : d1);
                    for (int r = 0; r < mr; r++)
                        acc[r] = v_fma(v_set1(xk[r * ldx + 4 * g + i]), wj, acc[r]);
                }
            }
            continue;
        }
        vf m = qt == QT_Q4_1 ? v_load_f16(w + 32) : qt == QT_Q4_K ? v_loadf(w + 64)
                                                                 : v_set1(8.0f);
        for (int g = 0; g < Q_BLOCK / 8; g++) {
            vq c = v_loadi(qs + g * 64);
            for (int i = 0; i < 4; i++) {
                vf lo = v_nibble(c, 8 * i), hi = v_nibble(c, 8 * i + 4);
                if (qt == QT_Q4_0) {
                    lo = v_mul(d, v_sub(lo, m));
                    hi = v_mul(d, v_sub(hi, m));
                } else {
                    lo = v_add(v_mul(d, lo), m);
                    hi = v_add(v_mul(d, hi), m);
                }
                for (int r = 0; r < mr; r++) {
                    acc[r] = v_fma(v_set1(xk[r * ldx + 4 * g + i]), lo, acc[r]);
                    acc[r] = v_fma(v_set1(xk[r * ldx + 16 + 4 * g + i]), hi, acc[r]);
                }
            }
        }
    }
    lin_store(mr, acc, y, ldy, out_bf16, m0, n0, N, bias);
}

/* A bf16 x widened into xf ([M, K] fp32, the caller's); returns the fp32 rows to read. */
static const float *lin_widen(int bf16, int64_t M, int64_t K, const void *x, int64_t *ldx,
                              float *xf) {
    if (!bf16) return x;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++)
            xf[m * K + k] = bf16_to_f32(((const uint16_t *)x)[m * *ldx + k]);
    *ldx = K;
    return xf;
}

/* x [M, K] (rows ldx elements apart) times packed weights of type wt: QT_DENSE, in the model's
 * dtype (fp32 or bf16: inputs, weights and output alike; a bf16 output may be fp32 instead,
 * out_f32, for logits), or a GGUF quantization (cpu_quant.h) with K a multiple of 32. A bf16 x
 * is widened into xf ([M, K] fp32, the caller's) first. */
static void linear(int wt, int bf16, int64_t M, int64_t K, int64_t N, const void *x,
                   int64_t ldx, const void *wp, const float *bias, void *y, int64_t ldy,
                   int out_f32, float *xf) {
    int64_t panels = (N + 15) / 16;
    const float *xw = lin_widen(bf16, M, K, x, &ldx, xf);
    int out_bf16 = bf16 && !out_f32;
    int64_t qpanel = K / Q_BLOCK * q_panel_block_bytes(wt);
    const uint8_t *qp = wp;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t n0 = p * 16;
        /* one case per type: the type is a constant inside each, so qlin_tile is
         * specialized for it */
#define QLIN_CASE(T) case T: \
            LIN_PANEL(VEC_QLIN_MR, qlin_tile, M, T, xw, ldx, qp + p * qpanel, K, y, ldy, \
                      out_bf16); \
            break;
        switch (wt) {
        QLIN_CASE(QT_Q4_0)
        QLIN_CASE(QT_Q4_1)
        QLIN_CASE(QT_Q8_0)
        QLIN_CASE(QT_Q4_K)
        QLIN_CASE(QT_Q6_K)
#undef QLIN_CASE
        default:
            if (bf16)
                LIN_PANEL(VEC_LIN_MR, lin_tile, M, xw, ldx, (const uint16_t *)wp + p * K * 16,
                          1, K, y, ldy, out_bf16);
            else
                LIN_PANEL(VEC_LIN_MR, lin_tile, M, xw, ldx, (const float *)wp + p * K * 16, 0,
                          K, y, ldy, 0);
        }
    }
}

#if VEC_DPBF16
/* The bf16 tile on vdpbf16ps: inputs stay bf16, a pair of them broadcast as one 32-bit value. */
ALWAYS_INLINE VEC_DPBF16_TARGET void lin_tile_dp(int mr, const uint16_t *x, int64_t ldx,
                                                const uint16_t *w, int64_t K, void *y,
                                                int64_t ldy, int out_bf16, int64_t m0,
                                                int64_t n0, int64_t N, const float *bias) {
    vf acc[VEC_LIN_MR];
    x += m0 * ldx;
    for (int r = 0; r < mr; r++) acc[r] = v_zero();
    for (int64_t k = 0; k < K; k += 2) {
        __m512bh wk = (__m512bh)_mm512_loadu_si512(w + k * 16);
        __builtin_prefetch((const char *)(w + k * 16) + LIN_PF, 0, LIN_PF_LOCALITY);
        for (int r = 0; r < mr; r++) {
            uint32_t pair;
            memcpy(&pair, x + r * ldx + k, 4);
            acc[r] = avx512_dot_bf16_pairs(acc[r], pair, wk);
        }
    }
    lin_store(mr, acc, y, ldy, out_bf16, m0, n0, N, bias);
}

/* `linear` with the dense bf16 case on vdpbf16ps: the AVX-512 table's where the CPU has AVX512-BF16. */
static VEC_DPBF16_TARGET void linear_dp(int wt, int bf16, int64_t M, int64_t K, int64_t N,
                                        const void *x, int64_t ldx, const void *wp,
                                        const float *bias, void *y, int64_t ldy, int out_f32,
                                        float *xf) {
    if (!bf16 || wt != QT_DENSE) {
        linear(wt, bf16, M, K, N, x, ldx, wp, bias, y, ldy, out_f32, xf);
        return;
    }
    int64_t panels = (N + 15) / 16;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t n0 = p * 16;
        LIN_PANEL(VEC_LIN_MR, lin_tile_dp, M, (const uint16_t *)x, ldx, (const uint16_t *)wp + p * K * 16, K,
                  y, ldy, !out_f32);
    }
}
#endif

#if VEC_VNNI
/* ---- the int8 path (--quantization gguf-native-q8): llama.cpp's arithmetic --------------------
 *
 * Inputs are quantized per row and block of 32 to int8, x ~ xd * xq with xd = max|x| / 127
 * (llama.cpp's Q8_0 activations), and a block's dot product with 16 rows of weights is integer:
 * vpdpbusd multiplies a 64-byte chunk of unsigned weight bytes (the nibbles, or Q8_0's quants
 * + 128) by four broadcast int8 inputs, 64 products in one instruction. The block's sum is then
 * scaled in fp32: d * xd * (sum - offset * sum(xq)) (+ m * xd * sum(xq) for Q4_1 and Q4_K),
 * offset 8 for Q4_0 and 128 for Q8_0. The fp32 path's results differ by the inputs' rounding
 * to 8 bits. */

/* x [M, K] (fp32 or bf16) -> xq [M, K] int8, xd [M, K/32] scales, xs [M, K/32] sums of xq. */
static VEC_VNNI_TARGET void quantize_rows_q8(int bf16, int64_t M, int64_t K, const void *x,
                                             int64_t ldx, int8_t *xq, float *xd, int32_t *xs) {
    int64_t nb = K / Q_BLOCK;
#pragma omp for schedule(static)
    for (int64_t mb = 0; mb < M * nb; mb++) {
        int64_t m = mb / nb, k = mb % nb * Q_BLOCK;
        vf a0 = v_load(ELEM(x, bf16, m * ldx + k), bf16, 16);
        vf a1 = v_load(ELEM(x, bf16, m * ldx + k + 16), bf16, 16);
        vf amax = v_max(v_max(a0, v_sub(v_zero(), a0)), v_max(a1, v_sub(v_zero(), a1)));
        float d = v_hmax(amax) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m512i q0 = _mm512_cvtps_epi32(v_mul(a0, v_set1(id)));
        __m512i q1 = _mm512_cvtps_epi32(v_mul(a1, v_set1(id)));
        _mm_storeu_si128((__m128i *)(xq + m * K + k), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + m * K + k + 16), _mm512_cvtepi32_epi8(q1));
        xd[mb] = d;
        xs[mb] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

ALWAYS_INLINE __m512i avx512_bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Rows m0..m0+mr of the quantized inputs against one panel (cpu_quant.h) of type qt. */
ALWAYS_INLINE VEC_VNNI_TARGET void qlin_tile_q8(int mr, const int qt, const int8_t *xq,
                                               int64_t K, const float *xd, const int32_t *xs,
                                               const uint8_t *w, void *y, int64_t ldy,
                                               int out_bf16, int64_t m0, int64_t n0, int64_t N,
                                               const float *bias) {
    vf acc[VEC_Q8_MR];
    __m512i is[VEC_Q8_MR];
    const int64_t pb = q_panel_block_bytes(qt), nb = K / Q_BLOCK;
    const int32_t offset = qt == QT_Q4_0 ? 8 : qt == QT_Q8_0 ? 128 : 0;
    xq += m0 * K;
    xd += m0 * nb;
    xs += m0 * nb;
    for (int r = 0; r < mr; r++) acc[r] = v_zero();
    for (int64_t b = 0; b < nb; b++, w += pb) {
        for (int64_t c = 0; c < pb; c += 64) __builtin_prefetch(w + c + LIN_PF, 0, LIN_PF_LOCALITY);
        const uint8_t *qs = w + q_quants_offset(qt);
        const int8_t *xb = xq + b * Q_BLOCK;
        for (int r = 0; r < mr; r++) is[r] = _mm512_setzero_si512();
        if (qt == QT_Q8_0) {
            for (int g = 0; g < Q_BLOCK / 4; g++) {
                __m512i c = _mm512_xor_si512(_mm512_loadu_si512(qs + g * 64),
                                             _mm512_set1_epi8((char)0x80));
                for (int r = 0; r < mr; r++)
                    is[r] = _mm512_dpbusd_epi32(is[r], c, avx512_bcast4(xb + r * K + 4 * g));
            }
        } else {
            for (int g = 0; g < Q_BLOCK / 8; g++) {
                __m512i c = _mm512_loadu_si512(qs + g * 64), mask = _mm512_set1_epi8(0x0F);
                __m512i lo = _mm512_and_si512(c, mask);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), mask);
                for (int r = 0; r < mr; r++) {
                    is[r] = _mm512_dpbusd_epi32(is[r], lo, avx512_bcast4(xb + r * K + 4 * g));
                    is[r] = _mm512_dpbusd_epi32(is[r], hi,
                                                avx512_bcast4(xb + r * K + 16 + 4 * g));
                }
            }
        }
        vf d = qt == QT_Q4_K ? v_loadf(w) : v_load_f16(w);
        vf m = qt == QT_Q4_K ? v_loadf(w + 64) : v_load_f16(w + 32);
        for (int r = 0; r < mr; r++) {
            int32_t sx = xs[r * nb + b];
            float dx = xd[r * nb + b];
            __m512i sum = offset ? _mm512_sub_epi32(is[r], _mm512_set1_epi32(offset * sx)) : is[r];
            acc[r] = v_fma(v_mul(d, v_set1(dx)), _mm512_cvtepi32_ps(sum), acc[r]);
            if (qt == QT_Q4_1 || qt == QT_Q4_K)
                acc[r] = v_fma(m, v_set1(dx * (float)sx), acc[r]);
        }
    }
    lin_store(mr, acc, y, ldy, out_bf16, m0, n0, N, bias);
}

/* `linear` for quantized weights on the int8 path: x quantized into xf (the caller's, at least
 * [M, K] fp32 of room) first; Q6_K takes `linear`, fp32 inputs. The AVX-512 table's
 * `linear_q8` where the CPU has AVX512-VNNI. */
static VEC_VNNI_TARGET void linear_q8(int wt, int bf16, int64_t M, int64_t K, int64_t N,
                                      const void *x, int64_t ldx, const void *wp,
                                      const float *bias, void *y, int64_t ldy, int out_f32,
                                      float *xf) {
    int64_t panels = (N + 15) / 16, qpanel = K / Q_BLOCK * q_panel_block_bytes(wt);
    int8_t *xq = (int8_t *)xf;
    float *xd = (float *)(xq + M * K);
    int32_t *xs = (int32_t *)(xd + M * K / Q_BLOCK);
    int out_bf16 = bf16 && !out_f32;
    const uint8_t *qp = wp;
    if (wt == QT_Q6_K) { /* two scales a block: fp32 inputs (cpu_linear.py logs it) */
        linear(wt, bf16, M, K, N, x, ldx, wp, bias, y, ldy, out_f32, xf);
        return;
    }
    quantize_rows_q8(bf16, M, K, x, ldx, xq, xd, xs);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t n0 = p * 16;
        switch (wt) {
        case QT_Q4_0:
            LIN_PANEL(VEC_Q8_MR, qlin_tile_q8, M, QT_Q4_0, xq, K, xd, xs, qp + p * qpanel, y,
                      ldy, out_bf16);
            break;
        case QT_Q4_1:
            LIN_PANEL(VEC_Q8_MR, qlin_tile_q8, M, QT_Q4_1, xq, K, xd, xs, qp + p * qpanel, y,
                      ldy, out_bf16);
            break;
        case QT_Q4_K:
            LIN_PANEL(VEC_Q8_MR, qlin_tile_q8, M, QT_Q4_K, xq, K, xd, xs, qp + p * qpanel, y,
                      ldy, out_bf16);
            break;
        default:
            LIN_PANEL(VEC_Q8_MR, qlin_tile_q8, M, QT_Q8_0, xq, K, xd, xs, qp + p * qpanel, y,
                      ldy, out_bf16);
        }
    }
}
#endif

/* ---- elementwise: each rounds where torch's op sequence would, so results match the reference
 * ops (exactly for the rotary, up to summation order and exp's last bit elsewhere) ---------- */

/* exp(x) as Cephes' expf: 2^n * p(r) with |r| <= ln2/2, within 1-2 ulp like torch's Sleef exp;
 * v_scale2 takes care of overflow to inf and underflow to 0. */
ALWAYS_INLINE vf v_exp(vf x) {
    x = v_min(v_max(x, v_set1(-104.0f)), v_set1(89.0f));
    vf n = v_rint(v_mul(x, v_set1(1.44269504088896341f)));
    vf r = v_fnma(n, v_set1(0.693359375f), x);
    r = v_fnma(n, v_set1(-2.12194440e-4f), r);
    vf p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    vf y = v_add(v_fma(p, v_mul(r, r), r), v_set1(1.0f));
    return v_scale2(y, n);
}

/* out = norm(s) * weight with s = x, or s = x + residual stored back into residual (the add
 * rounds to the dtype first, as torch's). The variance is taken in fp32 from rounded squares. */
static void rms_norm(int bf16, int64_t T, int64_t H, const void *x, int64_t ldx, void *res,
                     int64_t ldr, const void *weight, void *out, int64_t ldo, float eps) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const void *src = ELEM(x, bf16, t * ldx);
        vf ss = v_zero();
        for (int64_t c = 0; c < H; c += 16) {
            vf v = v_load(ELEM(src, bf16, c), bf16, H - c);
            if (res) {
                void *r = ELEM(res, bf16, t * ldr + c);
                v = v_round_to(v_add(v, v_load(r, bf16, H - c)), bf16);
                v_store(r, v, bf16, H - c);
            }
            ss = v_add(ss, v_mul(v, v));
        }
        float inv = 1.0f / sqrtf(v_hsum(ss) / (float)H + eps);
        const void *s = res ? ELEM(res, bf16, t * ldr) : src;
        for (int64_t c = 0; c < H; c += 16) {
            vf v = v_load(ELEM(s, bf16, c), bf16, H - c);
            vf w = v_load(ELEM(weight, bf16, c), bf16, H - c);
            vf h = v_round_to(v_mul(v, v_set1(inv)), bf16);
            v_store(ELEM(out, bf16, t * ldo + c), v_mul(w, h), bf16, H - c);
        }
    }
}

/* In place, on heads of D values at x + t * ldx + h * D: x * cos + rotate_half(x) * sin, with
 * cos/sin ([positions, D] fp32 tables) rounded to the dtype first as Hugging Face does. */
ALWAYS_INLINE void rotate_heads(int bf16, void *x, int64_t nheads, int64_t D, const float *cs,
                                const float *sn) {
    int64_t half = D / 2;
    for (int64_t h = 0; h < nheads; h++) {
        for (int64_t c = 0; c < half; c += 16) {
            int64_t n = half - c;
            void *p1 = ELEM(x, bf16, h * D + c), *p2 = ELEM(x, bf16, h * D + half + c);
            vf x1 = v_load(p1, bf16, n), x2 = v_load(p2, bf16, n);
            vf c1 = v_round_to(v_load(cs + c, 0, n), bf16);
            vf s1 = v_round_to(v_load(sn + c, 0, n), bf16);
            vf c2 = v_round_to(v_load(cs + half + c, 0, n), bf16);
            vf s2 = v_round_to(v_load(sn + half + c, 0, n), bf16);
            vf o1 = v_sub(v_round_to(v_mul(x1, c1), bf16), v_round_to(v_mul(x2, s1), bf16));
            vf o2 = v_add(v_round_to(v_mul(x2, c2), bf16), v_round_to(v_mul(x1, s2), bf16));
            v_store(p1, o1, bf16, n);
            v_store(p2, o2, bf16, n);
        }
    }
}

/* Positions must lie in the tables (cpu_kernels.h checks them: positions_valid). */
static void rotary(int bf16, int64_t T, const int64_t *positions, const float *cos_table,
                   const float *sin_table, int64_t D, void *q, int64_t ldq, int64_t nq, void *k,
                   int64_t ldk, int64_t nk) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_table + positions[t] * D, *sn = sin_table + positions[t] * D;
        rotate_heads(bf16, ELEM(q, bf16, t * ldq), nq, D, cs, sn);
        rotate_heads(bf16, ELEM(k, bf16, t * ldk), nk, D, cs, sn);
    }
}

/* out[t] = silu(gate) * up for gu[t] = [gate | up] (F each), rounding after each op. */
static void silu_and_mul(int bf16, int64_t T, int64_t F, const void *gu, int64_t ldgu, void *out,
                         int64_t ldo) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t c = 0; c < F; c += 16) {
            vf g = v_load(ELEM(gu, bf16, t * ldgu + c), bf16, F - c);
            vf u = v_load(ELEM(gu, bf16, t * ldgu + F + c), bf16, F - c);
            vf den = v_add(v_set1(1.0f), v_exp(v_sub(v_zero(), g)));
            vf silu = v_round_to(v_div(g, den), bf16);
            v_store(ELEM(out, bf16, t * ldo + c), v_mul(silu, u), bf16, F - c);
        }
    }
}

/* ---- attention over the paged KV cache ---------------------------------------------------
 *
 * Writes the step's keys/values into their slots, then (after a barrier) attends each query to
 * its sequence's context: the cached tokens plus the chunk's own up to itself (causal). One task
 * is (sequence, KV head, block of queries); the query heads of a KV head share the task's key
 * row offsets, looked up from the block table once per task, and read each K and V row once
 * for up to ATTN_GMAX of them (GQA), not once per query head. Scores go to a per-task buffer,
 * softmax runs over it, and values are summed with the weights: fp32 throughout, rounded once
 * at the output. DC = D / 16 and the number of heads GN are constants in each copy of the inner
 * loops so that the accumulators stay in registers.
 */

/* Query heads that share one pass over a KV head's rows: the value tile holds GN x CB
 * accumulators (CB chunks of 16 of the head dimension), at most VEC_ATTN_ACC of them. */
#define ATTN_GMAX (VEC_ATTN_ACC < 8 ? VEC_ATTN_ACC : 8)

/* Prefetches key j's K and V rows (j < n) into L1 (locality L = 3) or L2 (2). */
#define ATTN_PREFETCH(j, L) \
    do { \
        if ((j) < n) \
            for (int c = 0; c < DC * (bf16 ? 32 : 64); c += 64) { \
                __builtin_prefetch(k_cache + rows[j] + c, 0, L); \
                __builtin_prefetch(v_cache + rows[j] + c, 0, L); \
            } \
    } while (0)

/* scores[g * ls + j] = scale * q_g . k_j for the GN query heads q ([GN, D] fp32) and the n keys
 * at byte offsets rows[j] of the K cache: each K row is loaded (and widened) once for all the
 * heads. The V rows at the same offsets are prefetched for pv_sum. */
ALWAYS_INLINE void qk_scores(const int DC, const int GN, int bf16, const float *q,
                             const char *k_cache, const char *v_cache, const int64_t *rows,
                             int64_t n, float scale, float *scores, int64_t ls) {
    /* the first keys, then ahead of the loop as it goes */
    for (int64_t j = ATTN_PF; j < ATTN_PF_L2; j++) ATTN_PREFETCH(j, 2);
    for (int64_t j = 0; j < ATTN_PF; j++) ATTN_PREFETCH(j, 3);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        vf a[ATTN_GMAX][16];
        for (int u = 0; u < 16; u++) {
            if (j0 + u >= n) {
                for (int g = 0; g < GN; g++) a[g][u] = v_zero();
                continue;
            }
            const char *kp = k_cache + rows[j0 + u];
            ATTN_PREFETCH(j0 + u + ATTN_PF, 3);
            ATTN_PREFETCH(j0 + u + ATTN_PF_L2, 2);
            vf kr[16];
            for (int c = 0; c < DC; c++) kr[c] = v_load(ELEM(kp, bf16, c * 16), bf16, 16);
            for (int g = 0; g < GN; g++) {
                const float *qg = q + g * DC * 16;
                vf t = v_mul(v_loadf(qg), kr[0]);
                for (int c = 1; c < DC; c++) t = v_fma(v_loadf(qg + c * 16), kr[c], t);
                a[g][u] = t;
            }
        }
        for (int g = 0; g < GN; g++)
            v_store(scores + g * ls + j0, v_mul(v_hsum16(a[g]), v_set1(scale)), 0, n - j0);
    }
}

/* scores -> exp(scores - max) in place; returns their sum. */
ALWAYS_INLINE float softmax_numerators(float *scores, int64_t n) {
    vf mx = v_set1(-INFINITY);
    for (int64_t j = 0; j < n; j += 16)
        mx = v_max(mx, v_tail(v_load(scores + j, 0, n - j), n - j, -INFINITY));
    vf vmax = v_set1(v_hmax(mx)), sum = v_zero();
    for (int64_t j = 0; j < n; j += 16) {
        vf p = v_tail(v_exp(v_sub(v_load(scores + j, 0, n - j), vmax)), n - j, 0.0f);
        v_store(scores + j, p, 0, n - j);
        sum = v_add(sum, p);
    }
    return v_hsum(sum);
}

/* out_g = sum_j p_g[j] * v_j / sums[g] for the GN heads (p_g = p + g * ls), rounded to the
 * dtype: CB chunks of the head dimension at a time, each V chunk loaded once for all heads. */
ALWAYS_INLINE void pv_sum(const int DC, const int GN, int bf16, const float *p, int64_t ls,
                          const float *sums, const char *v_cache, const int64_t *rows,
                          int64_t n, void *out) {
    const int fit = VEC_ATTN_ACC / GN;
    const int CB = fit >= DC ? DC : fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
    for (int c0 = 0; c0 < DC; c0 += CB) {
        vf acc[ATTN_GMAX][16];
        for (int g = 0; g < GN; g++)
            for (int c = 0; c < CB; c++) acc[g][c] = v_zero();
        for (int64_t j = 0; j < n; j++) {
            const char *vp = v_cache + rows[j];
            for (int c = 0; c < CB; c++) {
                vf vc = v_load(ELEM(vp, bf16, (c0 + c) * 16), bf16, 16);
                for (int g = 0; g < GN; g++)
                    acc[g][c] = v_fma(v_set1(p[g * ls + j]), vc, acc[g][c]);
            }
        }
        for (int g = 0; g < GN; g++) {
            vf inv = v_set1(1.0f / sums[g]);
            for (int c = 0; c < CB; c++)
                v_store(ELEM(out, bf16, (g * DC + c0 + c) * 16), v_mul(acc[g][c], inv), bf16,
                        16);
        }
    }
}

/* GN query heads (fp32, [GN, D]) of one KV head, for a query that sees keys 0..n-1; scores
 * holds GN rows of ls. */
ALWAYS_INLINE void attend_heads(const int DC, const int GN, int bf16, const float *q,
                                const char *k_cache, const char *v_cache, const int64_t *rows,
                                int64_t n, float scale, float *scores, int64_t ls, void *out) {
    float sums[ATTN_GMAX];
    qk_scores(DC, GN, bf16, q, k_cache, v_cache, rows, n, scale, scores, ls);
    for (int g = 0; g < GN; g++) sums[g] = softmax_numerators(scores + g * ls, n);
    pv_sum(DC, GN, bf16, scores, ls, sums, v_cache, rows, n, out);
}

/* The G query heads (fp32, [G, D]) of one KV head, ATTN_GMAX at a time in bf16 (the switch
 * makes the count a constant in each copy; cases above ATTN_GMAX are compiled out), one at a
 * time in fp32, where a row costs no widening and grouping measured slower (AVX2: 12.1 ->
 * 14.3 ms). 30 layers of 16 decodes of 120 tokens, SmolLM2's 3 heads a KV head, CPU time of 1
 * thread, per head -> grouped in bf16: AVX-512 8.2 -> 7.4 ms, AVX2 10.3 -> 9.0; one decode
 * 0.54 -> 0.50 and 0.62 -> 0.55. */
#define ATTN_CASE(GN) \
    case GN: \
        if (GN <= ATTN_GMAX) \
            attend_heads(DC, GN, bf16, q + g0 * DC * 16, k_cache, v_cache, rows, n, scale, \
                         scores, ls, ELEM(out, bf16, g0 * DC * 16)); \
        break;
ALWAYS_INLINE void attend_one(const int DC, int bf16, const float *q, int64_t G,
                              const char *k_cache, const char *v_cache, const int64_t *rows,
                              int64_t n, float scale, float *scores, int64_t ls, void *out) {
    const int64_t gmax = bf16 ? ATTN_GMAX : 1;
    for (int64_t g0 = 0; g0 < G; g0 += gmax) {
        switch (G - g0 < gmax ? G - g0 : gmax) {
            ATTN_CASE(1) ATTN_CASE(2) ATTN_CASE(3) ATTN_CASE(4)
            ATTN_CASE(5) ATTN_CASE(6) ATTN_CASE(7) ATTN_CASE(8)
        default: break;
        }
    }
}
#undef ATTN_CASE

/* Writes the step's keys/values into their slots, then attends every query of the plan (whose
 * indices cpu_kernels.h checked against the cache: kv_indices_valid). A task is one block of
 * ATTN_QB queries of a sequence and one KV head. */
static void paged_attention(int bf16, const cpu_attention_plan *a, const void *q, int64_t ldq,
                            const void *k, const void *v, int64_t ldkv, void *k_cache,
                            void *v_cache, int64_t H, int64_t KVH, int64_t D, float scale,
                            void *out) {
    const int64_t *query_start = a->query_start, *seq_lens = a->seq_lens, *qb = a->qb_start;
    int64_t T = query_start[a->B], G = H / KVH, esz = bf16 ? 2 : 4, row = KVH * D * esz;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        memcpy((char *)k_cache + a->slot_mapping[t] * row, ELEM(k, bf16, t * ldkv), row);
        memcpy((char *)v_cache + a->slot_mapping[t] * row, ELEM(v, bf16, t * ldkv), row);
    }
    int64_t ls = a->max_len;
    float *scores = malloc((ATTN_GMAX * ls + G * D) * sizeof(float));
    float *qf = scores + ATTN_GMAX * ls;
    int64_t *rows = malloc(a->max_len * sizeof(int64_t)), b = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < qb[a->B] * KVH; task++) {
        int64_t g = task / KVH, kvh = task % KVH;
        while (g >= qb[b + 1]) b++;
        while (g < qb[b]) b--;
        int64_t q0 = query_start[b] + (g - qb[b]) * ATTN_QB;
        int64_t q1 = q0 + ATTN_QB < query_start[b + 1] ? q0 + ATTN_QB : query_start[b + 1];
        int64_t cached = seq_lens[b] - (query_start[b + 1] - query_start[b]);
        int64_t n_max = cached + (q1 - query_start[b]);
        const int32_t *table = a->block_tables + b * a->bt_stride;
        for (int64_t j = 0, blk = 0; j < n_max; blk++)
            for (int64_t off = 0; off < a->block_size && j < n_max; off++, j++)
                rows[j] = ((int64_t)table[blk] * a->block_size + off) * row + kvh * D * esz;
        for (int64_t i = q0; i < q1; i++) {
            for (int64_t e = 0; e < G * D; e += 16)
                v_storef(qf + e, v_load(ELEM(q, bf16, i * ldq + kvh * G * D + e), bf16, 16));
            int64_t n = cached + (i - query_start[b]) + 1;
            void *o = ELEM(out, bf16, (i * H + kvh * G) * D);
            const char *kc = k_cache, *vc = v_cache;
            switch (D / 16) {
            case 1: attend_one(1, bf16, qf, G, kc, vc, rows, n, scale, scores, ls, o); break;
            case 2: attend_one(2, bf16, qf, G, kc, vc, rows, n, scale, scores, ls, o); break;
            case 4: attend_one(4, bf16, qf, G, kc, vc, rows, n, scale, scores, ls, o); break;
            case 8: attend_one(8, bf16, qf, G, kc, vc, rows, n, scale, scores, ls, o); break;
            default: attend_one(16, bf16, qf, G, kc, vc, rows, n, scale, scores, ls, o); break;
            }
        }
    }
    free(scores);
    free(rows);
}

/* ---- greedy sampling -------------------------------------------------------------------- */

/* out[s] = the index of the first maximum of row s of logits [S, V] (fp32, rows ld apart), a NaN
 * counting as the maximum: torch.argmax's answer. Vector maxima of blocks of 256, the first
 * block holding the largest kept, then a scan of that block for it; a row holding a NaN or an
 * infinity (where x - x is NaN) is first scanned whole for a NaN. 16 rows of 49152 on 1
 * thread: torch.argmax 0.65 ms, this 0.05 ms (AVX2, AVX-512), 2.1 ms (portable). */
static void argmax_rows(int64_t S, int64_t V, const float *logits, int64_t ld, int64_t *out) {
#pragma omp for schedule(static)
    for (int64_t s = 0; s < S; s++) {
        const float *x = logits + s * ld;
        float m = -INFINITY, o = 0.0f;
        int64_t best = 0, j = 0;
        vf odd = v_zero();
        for (int64_t b = 0; b < V; b += 256) {
            int64_t e = b + 256 < V ? b + 256 : V;
            vf mx = v_set1(-INFINITY);
            for (j = b; j + 16 <= e; j += 16) {
                vf v = v_loadf(x + j);
                mx = v_max(mx, v);
                odd = v_add(odd, v_sub(v, v));
            }
            float bm = v_hmax(mx);
            for (; j < e; j++) { /* the row's last V % 16 */
                bm = x[j] > bm ? x[j] : bm;
                o += x[j] - x[j];
            }
            if (bm > m) {
                m = bm;
                best = b;
            }
        }
        o += v_hsum(odd);
        j = 0;
        if (o != o)
            while (j < V && x[j] == x[j]) j++;
        if (j == V || x[j] == x[j])
            for (j = best; x[j] != m; j++) {}
        out[s] = j;
    }
}

/* ---- the decoder stack of one step, in one parallel region ----------------------------------
 *
 * The layers' kernels in the order the model's modules call them (models/llama.py), with the
 * barriers of their worksharing loops as the only synchronisation: no Python between them, no
 * tensor allocated, no thread pool woken ~300 times a step. Every index was checked by the
 * caller (cpu_kernels.h, cpu_forward). Linears run the table's `lin`, which is vdpbf16ps's
 * where the CPU has it, on each weight's type (m->wtypes), or `lin_q8` (the int8 path, NULL
 * when off) where the weight is quantized; a quantized embedding is dequantized row by row. */
static void forward(cpu_linear_fn lin, cpu_linear_fn lin_q8, int bf16, const cpu_model *m,
                    int64_t T,
                    const int64_t *ids, const int64_t *positions, const cpu_attention_plan *a,
                    const cpu_buffers *w, void *out) {
    int64_t hd = m->hidden, D = m->head_dim, nq = m->heads * D, nkv = m->kv_heads * D;
    int64_t nqkv = nq + 2 * nkv, F = m->inter;
    void *q = w->qkv, *k = ELEM(w->qkv, bf16, nq), *v = ELEM(w->qkv, bf16, nq + nkv);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T; i++) {
            if (m->embed_type == QT_DENSE)
                memcpy(ELEM(w->res, bf16, i * hd), ELEM(m->embed, bf16, ids[i] * hd),
                       hd * (bf16 ? 2 : 4));
            else
                q_dequant_row(m->embed_type, hd, m->embed, ids[i], bf16,
                              ELEM(w->res, bf16, i * hd));
        }
/* the int8 path's linear (NULL: none) for quantized weights, else the table's */
#define LIN(t, ...) ((t) != QT_DENSE && lin_q8 ? lin_q8 : lin)(t, __VA_ARGS__)
        for (int64_t l = 0; l < m->layers; l++) {
            const int *wt = m->wtypes + 4 * l;
            /* the first layer's residual is the embedding itself */
            rms_norm(bf16, T, hd, l ? w->x : w->res, hd, l ? w->res : NULL, hd, m->in_norm[l],
                     w->h, hd, m->eps);
            LIN(wt[0], bf16, T, hd, nqkv, w->h, hd, m->qkv[l], m->qkv_bias[l], w->qkv, nqkv, 0,
                w->xf);
            rotary(bf16, T, positions, m->cos, m->sin, D, q, nqkv, m->heads, k, nqkv,
                   m->kv_heads);
            paged_attention(bf16, a, q, nqkv, k, v, nqkv, m->k_cache[l], m->v_cache[l],
                            m->heads, m->kv_heads, D, m->scale, w->attn);
            LIN(wt[1], bf16, T, nq, hd, w->attn, nq, m->o[l], NULL, w->x, hd, 0, w->xf);
            rms_norm(bf16, T, hd, w->x, hd, w->res, hd, m->post_norm[l], w->h, hd, m->eps);
            LIN(wt[2], bf16, T, hd, 2 * F, w->h, hd, m->gate_up[l], NULL, w->gate_up, 2 * F, 0,
                w->xf);
            silu_and_mul(bf16, T, F, w->gate_up, 2 * F, w->act, F);
            LIN(wt[3], bf16, T, F, hd, w->act, F, m->down[l], NULL, w->x, hd, 0, w->xf);
        }
        rms_norm(bf16, T, hd, w->x, hd, w->res, hd, m->final_norm, out, hd, m->eps);
#undef LIN
    }
}

static const cpu_kernel_table kernel_table = {linear, rms_norm, rotary, silu_and_mul,
                                              paged_attention, forward, argmax_rows};

#undef VEC_LIN_MR
#undef VEC_ATTN_ACC
#undef ATTN_GMAX
#undef ATTN_PREFETCH
#undef VEC_QLIN_MR
#undef VEC_DPBF16
#undef VEC_DPBF16_TARGET
#undef VEC_VNNI
#undef VEC_VNNI_TARGET
#undef VEC_Q8_MR
#undef VEC_MASKED_TAILS
#undef LIN_CASE
#undef LIN_PANEL
