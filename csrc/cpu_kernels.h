/* CPU kernels for the model's forward pass (fp32 and bf16), wrapped by csrc/cpu_kernels.pyx.
 *
 * Everything here is compiled for AVX-512 (F/BW/VL/DQ, plus AVX512-BF16 for the bf16 linear)
 * through the target pragma below, so the module builds with plain compiler flags; the Python
 * side calls these only after `cpu_supports()` said yes. Threads come from OpenMP: the module
 * links libgomp.so.1, the same runtime (and thread pool) torch loads, so torch.set_num_threads
 * applies here too. The module is built with -ffp-contract=off: GCC would otherwise fuse the
 * separate multiplies and adds written below (to round like torch's op sequence) into FMAs.
 */
#ifndef MINIVLLM_CPU_KERNELS_H
#define MINIVLLM_CPU_KERNELS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int cpu_supports(int need_bf16) {
    __builtin_cpu_init();
    int ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return ok && (!need_bf16 || __builtin_cpu_supports("avx512bf16"));
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---- loads and stores of 16 lanes, fp32 or bf16 in memory, fp32 in registers ------------- */

static inline __mmask16 tail_mask(int64_t n) {
    return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
}

ALWAYS_INLINE __m512 load16(const void *p, int bf16, __mmask16 m) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, p);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, p);
}

/* fp32 -> bf16 with round-to-nearest-even and quiet NaNs: bit-identical to torch's cast. */
ALWAYS_INLINE __m256i to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

ALWAYS_INLINE void store16(void *p, __m512 v, int bf16, __mmask16 m) {
    if (bf16)
        _mm256_mask_storeu_epi16(p, m, to_bf16(v));
    else
        _mm512_mask_storeu_ps(p, m, v);
}

/* Rounds to the storage dtype and back: what a torch op in that dtype would have produced. */
ALWAYS_INLINE __m512 round_to(__m512 v, int bf16) {
    if (!bf16) return v;
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

#define ELEM(p, bf16, i) ((void *)((char *)(p) + (i) * ((bf16) ? 2 : 4)))

/* ---- linear layers: y[M, N] = x[M, K] @ W^T + bias, W prepacked in 16-column panels ---------
 *
 * fp32 panels are [K][16]: one 64-byte row of 16 output columns per input index, so a panel
 * streams sequentially and the inner loop is one weight load and up to 16 FMAs with the input
 * broadcast from memory. bf16 panels are [K/2][16][2]: vdpbf16ps multiplies a pair of input
 * values (one 32-bit broadcast) by 16 column pairs. Threads split the panels; each thread's
 * panels are contiguous in memory. Rows go in chunks of 16 (one accumulator register each).
 */

#define LIN_MR 16
/* Software prefetch distance (bytes) along a thread's panels: decode-sized rows keep the FMA
 * units busy for a while per weight line, and the hardware prefetcher alone then lets the
 * weight stream stall the core; 4 KiB ahead took 30 layers at M = 16 from 32 to 21 ms (fp32)
 * and from 25 to 12 ms (bf16). */
#define LIN_PF 4096

ALWAYS_INLINE void lin_store(int mr, __m512 *acc, void *y, int64_t ldy, int out_bf16, int64_t m0,
                             int64_t n0, int64_t N, const float *bias) {
    __mmask16 m = tail_mask(N - n0);
    __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < mr; r++)
        store16(ELEM(y, out_bf16, (m0 + r) * ldy + n0), _mm512_add_ps(acc[r], b), out_bf16, m);
}

ALWAYS_INLINE void lin_tile_f32(int mr, const float *x, int64_t ldx, const float *w, int64_t K,
                                void *y, int64_t ldy, int out_bf16, int64_t m0, int64_t n0,
                                int64_t N, const float *bias) {
    __m512 acc[LIN_MR];
    x += m0 * ldx;
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 wk = _mm512_loadu_ps(w + k * 16);
        _mm_prefetch((const char *)(w + k * 16) + LIN_PF, _MM_HINT_T0);
        for (int r = 0; r < mr; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wk, acc[r]);
    }
    lin_store(mr, acc, y, ldy, out_bf16, m0, n0, N, bias);
}

ALWAYS_INLINE void lin_tile_bf16(int mr, const uint16_t *x, int64_t ldx, const uint16_t *w,
                                 int64_t K, void *y, int64_t ldy, int out_bf16, int64_t m0,
                                 int64_t n0, int64_t N, const float *bias) {
    __m512 acc[LIN_MR];
    x += m0 * ldx;
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        __m512bh wk = (__m512bh)_mm512_loadu_si512(w + k * 16);
        _mm_prefetch((const char *)(w + k * 16) + LIN_PF, _MM_HINT_T0);
        for (int r = 0; r < mr; r++) {
            uint32_t pair;
            memcpy(&pair, x + r * ldx + k, 4);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)pair), wk);
        }
    }
    lin_store(mr, acc, y, ldy, out_bf16, m0, n0, N, bias);
}

/* One panel for rows [0, M): full 16-row chunks, then the tail with its exact row count (the
 * switch makes `mr` a constant in each copy, so the accumulators stay in registers). */
#define LIN_PANEL(TILE, M, ...)                                                      \
    do {                                                                             \
        int64_t m0 = 0;                                                              \
        for (; m0 + LIN_MR <= (M); m0 += LIN_MR) TILE(LIN_MR, __VA_ARGS__, m0, n0, N, bias); \
        switch ((int)((M) - m0)) {                                                   \
        case 1: TILE(1, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 2: TILE(2, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 3: TILE(3, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 4: TILE(4, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 5: TILE(5, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 6: TILE(6, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 7: TILE(7, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 8: TILE(8, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 9: TILE(9, __VA_ARGS__, m0, n0, N, bias); break;                        \
        case 10: TILE(10, __VA_ARGS__, m0, n0, N, bias); break;                      \
        case 11: TILE(11, __VA_ARGS__, m0, n0, N, bias); break;                      \
        case 12: TILE(12, __VA_ARGS__, m0, n0, N, bias); break;                      \
        case 13: TILE(13, __VA_ARGS__, m0, n0, N, bias); break;                      \
        case 14: TILE(14, __VA_ARGS__, m0, n0, N, bias); break;                      \
        case 15: TILE(15, __VA_ARGS__, m0, n0, N, bias); break;                      \
        default: break;                                                              \
        }                                                                            \
    } while (0)

/* Packs an [N, K] weight (rows ldw elements apart) into panels, zero-padding N to 16. Both
 * layouts move 4-byte units: an fp32 value, or a bf16 pair along K. (torch's strided copy
 * took 0.85 s for SmolLM2's 538 MB; this takes ~0.1 s.) */
static void pack_panels(int64_t N, int64_t K, int esz, const void *w, int64_t ldw, uint32_t *out) {
    int64_t units = K * esz / 4, panels = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        uint32_t *dst = out + p * units * 16;
        for (int64_t j = 0; j < 16; j++) {
            int64_t n = p * 16 + j;
            const char *row = (const char *)w + n * ldw * esz;
            for (int64_t u = 0; u < units; u++) {
                uint32_t v = 0;
                if (n < N) memcpy(&v, row + u * 4, 4);
                dst[u * 16 + j] = v;
            }
        }
    }
}

static void linear_f32(int64_t M, int64_t K, int64_t N, const float *x, int64_t ldx,
                       const float *wp, const float *bias, float *y, int64_t ldy) {
    int64_t panels = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t n0 = p * 16;
        LIN_PANEL(lin_tile_f32, M, x, ldx, wp + p * K * 16, K, y, ldy, 0);
    }
}

/* bf16 inputs and weights; the output is bf16, or fp32 when out_f32 (logits). */
static void linear_bf16(int64_t M, int64_t K, int64_t N, const uint16_t *x, int64_t ldx,
                        const uint16_t *wp, const float *bias, void *y, int64_t ldy, int out_f32) {
    int64_t panels = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t n0 = p * 16;
        LIN_PANEL(lin_tile_bf16, M, x, ldx, wp + p * K * 16, K, y, ldy, !out_f32);
    }
}

/* ---- elementwise: each rounds where torch's op sequence would, so results match the reference
 * ops (exactly for the rotary, up to summation order and exp's last bit elsewhere) ---------- */

/* Elementwise kernels split rows over the threads from this many elements: at 16 decode rows
 * (9-25 K elements) the second thread took silu-and-mul from 0.70 to 0.43 ms a step in bf16
 * (0.38 to 0.27 in fp32), RMSNorm from 0.77 to 0.60, rotary from 0.44 to 0.33 (bf16). */
#define PAR_MIN_ELEMS (1 << 13)

ALWAYS_INLINE float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* exp(x) as Cephes' expf: 2^n * p(r) with |r| <= ln2/2, within 1-2 ulp like torch's Sleef exp;
 * scalef takes care of overflow to inf and underflow to 0. */
ALWAYS_INLINE __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* out = norm(s) * weight with s = x, or s = x + residual stored back into residual (the add
 * rounds to the dtype first, as torch's). The variance is taken in fp32 from rounded squares. */
static void rms_norm(int bf16, int64_t T, int64_t H, const void *x, int64_t ldx, void *res,
                     int64_t ldr, const void *weight, void *out, int64_t ldo, float eps) {
#pragma omp parallel for schedule(static) if (T * H >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const void *src = ELEM(x, bf16, t * ldx);
        __m512 ss = _mm512_setzero_ps();
        for (int64_t c = 0; c < H; c += 16) {
            __mmask16 m = tail_mask(H - c);
            __m512 v = load16(ELEM(src, bf16, c), bf16, m);
            if (res) {
                void *r = ELEM(res, bf16, t * ldr + c);
                v = round_to(_mm512_add_ps(v, load16(r, bf16, m)), bf16);
                store16(r, v, bf16, m);
            }
            ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
        }
        float inv = 1.0f / sqrtf(hsum(ss) / (float)H + eps);
        const void *s = res ? ELEM(res, bf16, t * ldr) : src;
        for (int64_t c = 0; c < H; c += 16) {
            __mmask16 m = tail_mask(H - c);
            __m512 v = load16(ELEM(s, bf16, c), bf16, m);
            __m512 w = load16(ELEM(weight, bf16, c), bf16, m);
            __m512 h = round_to(_mm512_mul_ps(v, _mm512_set1_ps(inv)), bf16);
            store16(ELEM(out, bf16, t * ldo + c), _mm512_mul_ps(w, h), bf16, m);
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
            __mmask16 m = tail_mask(half - c);
            void *p1 = ELEM(x, bf16, h * D + c), *p2 = ELEM(x, bf16, h * D + half + c);
            __m512 x1 = load16(p1, bf16, m), x2 = load16(p2, bf16, m);
            __m512 c1 = round_to(_mm512_maskz_loadu_ps(m, cs + c), bf16);
            __m512 s1 = round_to(_mm512_maskz_loadu_ps(m, sn + c), bf16);
            __m512 c2 = round_to(_mm512_maskz_loadu_ps(m, cs + half + c), bf16);
            __m512 s2 = round_to(_mm512_maskz_loadu_ps(m, sn + half + c), bf16);
            __m512 o1 = _mm512_sub_ps(round_to(_mm512_mul_ps(x1, c1), bf16),
                                      round_to(_mm512_mul_ps(x2, s1), bf16));
            __m512 o2 = _mm512_add_ps(round_to(_mm512_mul_ps(x2, c2), bf16),
                                      round_to(_mm512_mul_ps(x1, s2), bf16));
            store16(p1, o1, bf16, m);
            store16(p2, o2, bf16, m);
        }
    }
}

/* Returns -1, touching nothing, if a position lies outside the tables' [0, P). */
static int rotary(int bf16, int64_t T, const int64_t *positions, int64_t P, const float *cos_table,
                  const float *sin_table, int64_t D, void *q, int64_t ldq, int64_t nq, void *k,
                  int64_t ldk, int64_t nk) {
    for (int64_t t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] >= P) return -1;
#pragma omp parallel for schedule(static) if (T * (nq + nk) * D >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_table + positions[t] * D, *sn = sin_table + positions[t] * D;
        rotate_heads(bf16, ELEM(q, bf16, t * ldq), nq, D, cs, sn);
        rotate_heads(bf16, ELEM(k, bf16, t * ldk), nk, D, cs, sn);
    }
    return 0;
}

/* out[t] = silu(gate) * up for gu[t] = [gate | up] (F each), rounding after each op. */
static void silu_and_mul(int bf16, int64_t T, int64_t F, const void *gu, int64_t ldgu, void *out,
                         int64_t ldo) {
#pragma omp parallel for schedule(static) if (T * F >= PAR_MIN_ELEMS)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t c = 0; c < F; c += 16) {
            __mmask16 m = tail_mask(F - c);
            __m512 g = load16(ELEM(gu, bf16, t * ldgu + c), bf16, m);
            __m512 u = load16(ELEM(gu, bf16, t * ldgu + F + c), bf16, m);
            __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
            __m512 silu = round_to(_mm512_div_ps(g, den), bf16);
            store16(ELEM(out, bf16, t * ldo + c), _mm512_mul_ps(silu, u), bf16, m);
        }
    }
}

/* ---- attention over the paged KV cache ---------------------------------------------------
 *
 * Writes the step's keys/values into their slots, then (after a barrier) attends each query to
 * its sequence's context: the cached tokens plus the chunk's own up to itself (causal). One task
 * is (sequence, KV head, block of queries); the query heads of a KV head share the task's key
 * row offsets, looked up from the block table once per task. Scores go to a per-task buffer,
 * softmax runs over it, and values are summed with the weights: fp32 throughout, rounded once
 * at the output. DC = D / 16 is a constant in each copy of the inner loops so that a query head
 * and its accumulators stay in registers.
 */

#define ATTN_QB 16
/* Keys ahead whose K and V rows the score loop prefetches: contexts are scattered over the
 * cache's blocks, which the hardware prefetcher does not follow. 30 layers at 16 decodes of
 * ~120 tokens: 10.5 -> 6.3 ms in fp32, 5.9 -> 4.4 ms in bf16. */
#define ATTN_PF 16

/* The 16 horizontal sums of a[0..15], as one vector: a transpose-and-add tree of 45 shuffles
 * and adds instead of 16 separate reductions (~9 ops each). Decode attention with hot caches
 * (16 sequences of 110 tokens) went from 115 to 75 us a layer in fp32, 102 to 81 in bf16. */
ALWAYS_INLINE __m512 hsum16(const __m512 *a) {
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

/* scores[j] = scale * q . k_j for the n keys at byte offsets rows[j] of the K cache (the V
 * rows at the same offsets are prefetched for pv_sum). */
ALWAYS_INLINE void qk_scores(const int DC, int bf16, const float *q, const char *k_cache,
                             const char *v_cache, const int64_t *rows, int64_t n, float scale,
                             float *scores) {
    __m512 qr[16];
    for (int c = 0; c < DC; c++) qr[c] = _mm512_loadu_ps(q + c * 16);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 a[16];
        for (int u = 0; u < 16; u++) {
            if (j0 + u >= n) {
                a[u] = _mm512_setzero_ps();
                continue;
            }
            const char *kp = k_cache + rows[j0 + u];
            if (j0 + ATTN_PF + u < n)
                for (int c = 0; c < DC * (bf16 ? 32 : 64); c += 64) {
                    _mm_prefetch(k_cache + rows[j0 + ATTN_PF + u] + c, _MM_HINT_T0);
                    _mm_prefetch(v_cache + rows[j0 + ATTN_PF + u] + c, _MM_HINT_T0);
                }
            a[u] = _mm512_mul_ps(qr[0], load16(kp, bf16, 0xFFFF));
            for (int c = 1; c < DC; c++)
                a[u] = _mm512_fmadd_ps(qr[c], load16(ELEM(kp, bf16, c * 16), bf16, 0xFFFF), a[u]);
        }
        __m512 sums = _mm512_mul_ps(hsum16(a), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(scores + j0, tail_mask(n - j0), sums);
    }
}

/* scores -> exp(scores - max) in place; returns their sum. */
ALWAYS_INLINE float softmax_numerators(float *scores, int64_t n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16)
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n - j), scores + j));
    __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 m = tail_mask(n - j);
        __m512 s = _mm512_maskz_loadu_ps(m, scores + j);
        __m512 p = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(s, vmax)));
        _mm512_mask_storeu_ps(scores + j, m, p);
        sum = _mm512_add_ps(sum, p);
    }
    return hsum(sum);
}

/* out = sum_j p[j] * v_j / sum, rounded to the dtype. */
ALWAYS_INLINE void pv_sum(const int DC, int bf16, const float *p, float sum, const char *v_cache,
                          const int64_t *rows, int64_t n, void *out) {
    __m512 acc[16];
    for (int c = 0; c < DC; c++) acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const char *vp = v_cache + rows[j];
        __m512 pj = _mm512_set1_ps(p[j]);
        for (int c = 0; c < DC; c++)
            acc[c] = _mm512_fmadd_ps(pj, load16(ELEM(vp, bf16, c * 16), bf16, 0xFFFF), acc[c]);
    }
    __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int c = 0; c < DC; c++)
        store16(ELEM(out, bf16, c * 16), _mm512_mul_ps(acc[c], inv), bf16, 0xFFFF);
}

/* The G query heads (fp32, [G, D]) of one KV head, for a query that sees keys 0..n-1. */
ALWAYS_INLINE void attend_one(const int DC, int bf16, const float *q, int64_t G,
                              const char *k_cache, const char *v_cache, const int64_t *rows,
                              int64_t n, float scale, float *scores, void *out) {
    for (int64_t g = 0; g < G; g++) {
        qk_scores(DC, bf16, q + g * DC * 16, k_cache, v_cache, rows, n, scale, scores);
        float sum = softmax_numerators(scores, n);
        pv_sum(DC, bf16, scores, sum, v_cache, rows, n, ELEM(out, bf16, g * DC * 16));
    }
}

/* Whether every slot the step writes and every block its contexts read lie in the cache. */
static int kv_indices_valid(int64_t B, const int64_t *query_start, const int64_t *seq_lens,
                            const int32_t *block_tables, int64_t bt_stride, int64_t block_size,
                            const int64_t *slot_mapping, int64_t num_blocks) {
    for (int64_t t = 0; t < query_start[B]; t++)
        if (slot_mapping[t] < 0 || slot_mapping[t] >= num_blocks * block_size) return 0;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < (seq_lens[b] + block_size - 1) / block_size; i++)
            if ((uint32_t)block_tables[b * bt_stride + i] >= (uint64_t)num_blocks) return 0;
    return 1;
}

/* Returns -1, touching nothing, if a slot or block index lies outside the cache. */
static int paged_attention(int bf16, int64_t B, const int64_t *query_start, const int64_t *seq_lens,
                           const int32_t *block_tables, int64_t bt_stride, int64_t block_size,
                           const int64_t *slot_mapping, const void *q, int64_t ldq,
                           const void *k, const void *v, int64_t ldkv, void *k_cache,
                           void *v_cache, int64_t num_blocks, int64_t H, int64_t KVH, int64_t D,
                           float scale, void *out) {
    if (!kv_indices_valid(B, query_start, seq_lens, block_tables, bt_stride, block_size,
                          slot_mapping, num_blocks))
        return -1;
    int64_t T = query_start[B], G = H / KVH, esz = bf16 ? 2 : 4, row = KVH * D * esz;
    int64_t *task_start = malloc((B + 1) * sizeof(int64_t)), max_len = 0;
    task_start[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t qlen = query_start[b + 1] - query_start[b];
        task_start[b + 1] = task_start[b] + (qlen + ATTN_QB - 1) / ATTN_QB * KVH;
        max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            memcpy((char *)k_cache + slot_mapping[t] * row, ELEM(k, bf16, t * ldkv), row);
            memcpy((char *)v_cache + slot_mapping[t] * row, ELEM(v, bf16, t * ldkv), row);
        }
        float *scores = malloc((max_len + G * D) * sizeof(float)), *qf = scores + max_len;
        int64_t *rows = malloc(max_len * sizeof(int64_t)), b = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < task_start[B]; task++) {
            while (task >= task_start[b + 1]) b++;
            while (task < task_start[b]) b--;
            int64_t local = task - task_start[b], kvh = local % KVH;
            int64_t q0 = query_start[b] + local / KVH * ATTN_QB;
            int64_t q1 = q0 + ATTN_QB < query_start[b + 1] ? q0 + ATTN_QB : query_start[b + 1];
            int64_t cached = seq_lens[b] - (query_start[b + 1] - query_start[b]);
            int64_t n_max = cached + (q1 - query_start[b]);
            const int32_t *table = block_tables + b * bt_stride;
            for (int64_t j = 0, blk = 0; j < n_max; blk++)
                for (int64_t off = 0; off < block_size && j < n_max; off++, j++)
                    rows[j] = ((int64_t)table[blk] * block_size + off) * row + kvh * D * esz;
            for (int64_t i = q0; i < q1; i++) {
                for (int64_t e = 0; e < G * D; e += 16)
                    _mm512_storeu_ps(qf + e, load16(ELEM(q, bf16, i * ldq + kvh * G * D + e),
                                                    bf16, 0xFFFF));
                int64_t n = cached + (i - query_start[b]) + 1;
                void *o = ELEM(out, bf16, (i * H + kvh * G) * D);
                const char *kc = k_cache, *vc = v_cache;
                switch (D / 16) {
                case 1: attend_one(1, bf16, qf, G, kc, vc, rows, n, scale, scores, o); break;
                case 2: attend_one(2, bf16, qf, G, kc, vc, rows, n, scale, scores, o); break;
                case 4: attend_one(4, bf16, qf, G, kc, vc, rows, n, scale, scores, o); break;
                case 8: attend_one(8, bf16, qf, G, kc, vc, rows, n, scale, scores, o); break;
                default: attend_one(16, bf16, qf, G, kc, vc, rows, n, scale, scores, o); break;
                }
            }
        }
        free(scores);
        free(rows);
    }
    free(task_start);
    return 0;
}

#pragma GCC pop_options
#endif
