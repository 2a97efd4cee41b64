/* CPU kernels for the model's forward pass (fp32 and bf16), wrapped by csrc/cpu_kernels.pyx.
 *
 * One source, several ISAs: the kernel bodies (cpu_kernels_body.h) are written once against a
 * thin vector layer, `vf` (16 fp32 lanes) and its `v_*` ops, that each ISA defines in its own
 * header (cpu_vec_avx512.h, cpu_vec_avx2.h, cpu_vec_portable.h). This file includes the body
 * once per ISA under that ISA's `#pragma GCC target`, so the module builds with plain compiler
 * flags and runs on any x86-64 CPU; every name the body and the layers share is prefixed with
 * the ISA (`ISA_NAME`, below), and each copy exports one `cpu_kernel_table`. The Python side
 * takes a table from `cpu_kernel_table_for()` only after `cpu_isa_missing()` said the CPU runs it,
 * so no instruction the CPU lacks is ever executed.
 *
 * Threads come from OpenMP: the module links libgomp.so.1, the same runtime (and thread pool)
 * torch loads, so torch.set_num_threads applies here too. The module is built with
 * -ffp-contract=off: GCC would otherwise fuse the separate multiplies and adds written in the
 * body (to round like torch's op sequence) into FMAs, and the portable path's v_fma would round
 * differently on different targets.
 *
 * Rounding rules, the same on every path: elementwise kernels round where torch's op sequence
 * would (the rotary and the residual add exactly as torch; RMSNorm and SiLU up to summation
 * order and exp's last bit); linears and attention accumulate in fp32 and round once at the
 * output. Paths differ from each other only in summation order and FMA (one rounding) against
 * multiply-add (two, the portable path).
 */
#ifndef MINIVLLM_CPU_KERNELS_H
#define MINIVLLM_CPU_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_quant.h"

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define ELEM(p, bf16, i) ((void *)((char *)(p) + (i) * ((bf16) ? 2 : 4)))

/* One step's attention metadata (AttentionPlan in cpu_kernels.pyx builds it once a step). */
typedef struct {
    int64_t B, bt_stride, block_size;
    const int64_t *query_start, *seq_lens, *slot_mapping; /* [B+1], [B], [T] */
    const int32_t *block_tables;                           /* [B, bt_stride] */
    int64_t *qb_start; /* [B+1]: blocks of ATTN_QB queries before each sequence (malloc'ed) */
    int64_t max_len;   /* the longest context */
} cpu_attention_plan;

/* A Llama/Qwen2 decoder stack for `forward`: its weights as the kernels take them (linears
 * packed, in the model's dtype or quantized, the rest as loaded in the model's dtype) and its
 * KV caches; per-layer arrays
 * hold one pointer per layer. */
typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter;
    float eps, scale;
    const void *embed, *final_norm;
    int embed_type;    /* cpu_quant.h's QT_*: QT_DENSE, or the packed panels of a quantized head */
    const int *wtypes; /* [layers][4]: the QT_* of qkv, o, gate_up, down */
    int act_q8;        /* quantized linears on the table's linear_q8 (the int8 path) */
    const float *cos, *sin; /* rotary tables [positions, head_dim] */
    const void **in_norm, **post_norm, **qkv, **o, **gate_up, **down;
    const float **qkv_bias; /* NULL entries: no bias */
    void **k_cache, **v_cache;
} cpu_model;

/* forward's activations, T rows each (the caller's, reused every step): res/x/h [T, hidden],
 * qkv [T, (heads + 2 kv_heads) head_dim], attn [T, heads head_dim], gate_up [T, 2 inter],
 * act [T, inter], in the model's dtype; xf [T, max(hidden, heads head_dim, inter)] fp32, where
 * the AVX2 and portable bf16 linears widen their inputs. */
typedef struct {
    void *res, *x, *h, *qkv, *attn, *gate_up, *act;
    float *xf;
} cpu_buffers;

/* One ISA's kernels, to be called by every thread of a parallel region (their loops are
 * orphaned `omp for`s); the signatures are documented at their definitions in the body. The
 * cpu_* functions below run them one at a time, each in its own region. */
typedef void (*cpu_linear_fn)(int wt, int bf16, int64_t M, int64_t K, int64_t N, const void *x,
                              int64_t ldx, const void *wp, const float *bias, void *y,
                              int64_t ldy, int out_f32, float *xf);
typedef struct {
    cpu_linear_fn linear;
    void (*rms_norm)(int bf16, int64_t T, int64_t H, const void *x, int64_t ldx, void *res,
                     int64_t ldr, const void *weight, void *out, int64_t ldo, float eps);
    void (*rotary)(int bf16, int64_t T, const int64_t *positions, const float *cos_table,
                   const float *sin_table, int64_t D, void *q, int64_t ldq, int64_t nq, void *k,
                   int64_t ldk, int64_t nk);
    void (*silu_and_mul)(int bf16, int64_t T, int64_t F, const void *gu, int64_t ldgu,
                         void *out, int64_t ldo);
    void (*paged_attention)(int bf16, const cpu_attention_plan *a, const void *q, int64_t ldq,
                            const void *k, const void *v, int64_t ldkv, void *k_cache,
                            void *v_cache, int64_t H, int64_t KVH, int64_t D, float scale,
                            void *out);
    void (*forward)(cpu_linear_fn linear, cpu_linear_fn linear_q8, int bf16, const cpu_model *m,
                    int64_t T,
                    const int64_t *ids, const int64_t *positions, const cpu_attention_plan *a,
                    const cpu_buffers *w, void *out);
    void (*argmax_rows)(int64_t S, int64_t V, const float *logits, int64_t ld, int64_t *out);
    cpu_linear_fn linear_q8; /* the int8 path for quantized weights; NULL where the CPU lacks it */
} cpu_kernel_table;

/* ---- tuning constants, shared by every ISA ----------------------------------------------- */

/* Software prefetch distance (bytes) along a thread's weight panels: decode-sized rows keep the
 * FMA units busy for a while per weight line, and the hardware prefetcher alone then lets the
 * weight stream stall the core; 4 KiB ahead took 30 layers at M = 16 from 32 to 21 ms (fp32)
 * and from 25 to 12 ms (bf16) with AVX-512. Into L2 (locality 2, prefetcht1), not L1: an L1
 * prefetch holds one of the core's few L1 miss buffers for a whole DRAM trip, which capped the
 * stream; SmolLM2's 121 linears at M = 16, AVX-512 bf16: 23.4-26.0 -> 22.7-23.9 ms, the LM head
 * alone 4.6 -> 4.2 ms. Tiles of one or two rows still prefetch into L1 (lin_prefetch). */
#define LIN_PF 4096
#define LIN_PF_LOCALITY 2

/* Elementwise kernels split rows over the threads from this many elements: at 16 decode rows
 * (9-25 K elements) the second thread took silu-and-mul from 0.70 to 0.43 ms a step in bf16
 * (0.38 to 0.27 in fp32), RMSNorm from 0.77 to 0.60, rotary from 0.44 to 0.33 (bf16). */
#define PAR_MIN_ELEMS (1 << 13)

/* Attention: queries of a sequence per task, and keys ahead whose K and V rows the score loop
 * prefetches: contexts are scattered over the cache's blocks, which the hardware prefetcher
 * does not follow. ATTN_PF keys ahead into L1 (30 layers at 16 decodes of ~120 tokens, hot
 * caches: 10.5 -> 6.3 ms in fp32, 5.9 -> 4.4 ms in bf16, AVX-512), and ATTN_PF_L2 keys ahead
 * into L2, which keeps enough DRAM reads in flight when the layers' caches are cold, as in a
 * real step: 30 layers each with its own cache, AVX-512 bf16, 16 decodes of ~110 tokens
 * 7.4-8.3 -> 4.8-5.1 ms, of ~400 tokens 27.4 -> 15.6 ms, one of ~2000 tokens 9.4 -> 4.9 ms;
 * AVX2 bf16 16 x 110: 10.2-10.9 -> 6.5-6.6 ms. */
#define ATTN_QB 16
#define ATTN_PF 16
#define ATTN_PF_L2 64

/* ---- ISA-independent parts ----------------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Packs an [N, K] weight (rows ldw elements apart) into 16-column panels, zero-padding N to
 * 16: fp32 [K][16], bf16 [K/2][16][2] (pairs along K). Both layouts move 4-byte units: an fp32
 * value, or a bf16 pair. One layout for every ISA. (torch's strided copy took 0.85 s for
 * SmolLM2's 538 MB; this takes ~0.1 s.) */
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

/* Whether the n indices all lie in [0, limit). */
static int indices_valid(int64_t n, const int64_t *idx, int64_t limit) {
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= limit) return 0;
    return 1;
}

/* Whether every slot the step writes and every block its contexts read lie in the cache. */
static int kv_indices_valid(const cpu_attention_plan *a, int64_t num_blocks) {
    if (!indices_valid(a->query_start[a->B], a->slot_mapping, num_blocks * a->block_size))
        return 0;
    for (int64_t b = 0; b < a->B; b++)
        for (int64_t i = 0; i < (a->seq_lens[b] + a->block_size - 1) / a->block_size; i++)
            if ((uint32_t)a->block_tables[b * a->bt_stride + i] >= (uint64_t)num_blocks) return 0;
    return 1;
}

/* Fills the plan's derived fields (qb_start: free it with attention_plan_free). */
static void attention_plan_init(cpu_attention_plan *a) {
    a->qb_start = malloc((a->B + 1) * sizeof(int64_t));
    a->qb_start[0] = a->max_len = 0;
    for (int64_t b = 0; b < a->B; b++) {
        int64_t qlen = a->query_start[b + 1] - a->query_start[b];
        a->qb_start[b + 1] = a->qb_start[b] + (qlen + ATTN_QB - 1) / ATTN_QB;
        a->max_len = a->seq_lens[b] > a->max_len ? a->seq_lens[b] : a->max_len;
    }
}

static void attention_plan_free(cpu_attention_plan *a) {
    free(a->qb_start);
    a->qb_start = NULL;
}

/* ---- one copy of the body per ISA ---------------------------------------------------------- */

#define ISA_CAT2(a, b) a##_##b
#define ISA_CAT(a, b) ISA_CAT2(a, b)
#define ISA_NAME(x) ISA_CAT(ISA, x)
/* the vector layer's names */
#define vf ISA_NAME(vf)
#define v_zero ISA_NAME(v_zero)
#define v_set1 ISA_NAME(v_set1)
#define v_add ISA_NAME(v_add)
#define v_sub ISA_NAME(v_sub)
#define v_mul ISA_NAME(v_mul)
#define v_div ISA_NAME(v_div)
#define v_max ISA_NAME(v_max)
#define v_min ISA_NAME(v_min)
#define v_fma ISA_NAME(v_fma)
#define v_fnma ISA_NAME(v_fnma)
#define v_loadf ISA_NAME(v_loadf)
#define v_storef ISA_NAME(v_storef)
#define v_load_full ISA_NAME(v_load_full)
#define v_store_full ISA_NAME(v_store_full)
#define v_load ISA_NAME(v_load)
#define v_store ISA_NAME(v_store)
#define v_round_to ISA_NAME(v_round_to)
#define v_tail ISA_NAME(v_tail)
#define v_hsum ISA_NAME(v_hsum)
#define v_hmax ISA_NAME(v_hmax)
#define v_hsum16 ISA_NAME(v_hsum16)
#define v_rint ISA_NAME(v_rint)
#define v_scale2 ISA_NAME(v_scale2)
#define v_bf16_half ISA_NAME(v_bf16_half)
#define vq ISA_NAME(vq)
#define v_loadi ISA_NAME(v_loadi)
#define v_nibble ISA_NAME(v_nibble)
#define v_sbyte ISA_NAME(v_sbyte)
#define v_load_f16 ISA_NAME(v_load_f16)
/* the body's */
#define v_exp ISA_NAME(v_exp)
#define lin_store ISA_NAME(lin_store)
#define lin_prefetch ISA_NAME(lin_prefetch)
#define lin_tile ISA_NAME(lin_tile)
#define linear ISA_NAME(linear)
#define lin_widen ISA_NAME(lin_widen)
#define qlin_tile ISA_NAME(qlin_tile)
#define lin_tile_dp ISA_NAME(lin_tile_dp)
#define linear_dp ISA_NAME(linear_dp)
#define quantize_rows_q8 ISA_NAME(quantize_rows_q8)
#define qlin_tile_q8 ISA_NAME(qlin_tile_q8)
#define linear_q8 ISA_NAME(linear_q8)
#define rms_norm ISA_NAME(rms_norm)
#define rotate_heads ISA_NAME(rotate_heads)
#define rotary ISA_NAME(rotary)
#define silu_and_mul ISA_NAME(silu_and_mul)
#define qk_scores ISA_NAME(qk_scores)
#define softmax_numerators ISA_NAME(softmax_numerators)
#define pv_sum ISA_NAME(pv_sum)
#define attend_heads ISA_NAME(attend_heads)
#define attend_one ISA_NAME(attend_one)
#define paged_attention ISA_NAME(paged_attention)
#define forward ISA_NAME(forward)
#define argmax_rows ISA_NAME(argmax_rows)
#define kernel_table ISA_NAME(kernel_table)

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define ISA avx512
#include "cpu_vec_avx512.h"
#include "cpu_kernels_body.h"
#undef ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ISA avx2
#include "cpu_vec_avx2.h"
#include "cpu_kernels_body.h"
#undef ISA
#pragma GCC pop_options
#endif

/* No target: what the compiler's baseline has (SSE2 on x86-64, NEON on arm64). */
#define ISA portable
#include "cpu_vec_portable.h"
#include "cpu_kernels_body.h"
#undef ISA

/* The renaming macros above stay defined: with ISA undefined, a kernel name used past here would
 * read ISA_<name> and fail to compile, not call one ISA's copy. Only the names of the table's
 * fields, which the code below reads, are freed. */
#undef linear
#undef rms_norm
#undef rotary
#undef silu_and_mul
#undef paged_attention
#undef forward
#undef argmax_rows
#undef linear_q8

/* ---- run-time choice ----------------------------------------------------------------------- */

enum { CPU_ISA_AVX512, CPU_ISA_AVX2, CPU_ISA_PORTABLE, CPU_ISA_COUNT };

/* What the CPU lacks to run an ISA's kernels, in words for an error message; NULL: it runs. */
static const char *cpu_isa_missing(int isa) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (isa == CPU_ISA_AVX512 &&
        !(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
          __builtin_cpu_supports("fma")))
        return "a CPU with AVX-512 (avx512f, avx512bw, avx512vl, avx512dq)";
    if (isa == CPU_ISA_AVX2 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                 __builtin_cpu_supports("f16c")))
        return "a CPU with AVX2, FMA and F16C";
#else
    if (isa != CPU_ISA_PORTABLE) return "an x86-64 CPU";
#endif
    return NULL;
}

/* Whether the CPU has AVX512-BF16: the AVX-512 table then takes the vdpbf16ps linear. */
static int cpu_has_bf16_dot(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* Whether the CPU has AVX512-VNNI: the AVX-512 table then has the int8 path (linear_q8). */
static int cpu_has_int8_dot(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* The table of a supported ISA (check cpu_isa_missing first). */
static cpu_kernel_table cpu_kernel_table_for(int isa) {
#if defined(__x86_64__)
    if (isa == CPU_ISA_AVX512) {
        cpu_kernel_table t = avx512_kernel_table;
        if (cpu_has_bf16_dot()) t.linear = avx512_linear_dp;
        if (cpu_has_int8_dot()) t.linear_q8 = avx512_linear_q8;
        return t;
    }
    if (isa == CPU_ISA_AVX2) return avx2_kernel_table;
#endif
    return portable_kernel_table;
}

/* ---- the kernels one at a time, each in its own parallel region ---------------------------- */

/* act_q8: a quantized weight on the int8 path (t->linear_q8, which the caller checked). */
static void cpu_linear(const cpu_kernel_table *t, int wt, int act_q8, int bf16, int64_t M,
                       int64_t K, int64_t N, const void *x, int64_t ldx, const void *wp,
                       const float *bias, void *y, int64_t ldy, int out_f32) {
    cpu_linear_fn lin = act_q8 && wt != QT_DENSE ? t->linear_q8 : t->linear;
    float *xf = bf16 || act_q8 ? malloc(M * K * sizeof(float)) : NULL;
#pragma omp parallel
    lin(wt, bf16, M, K, N, x, ldx, wp, bias, y, ldy, out_f32, xf);
    free(xf);
}

static void cpu_rms_norm(const cpu_kernel_table *t, int bf16, int64_t T, int64_t H,
                         const void *x, int64_t ldx, void *res, int64_t ldr, const void *weight,
                         void *out, int64_t ldo, float eps) {
#pragma omp parallel if (T * H >= PAR_MIN_ELEMS)
    t->rms_norm(bf16, T, H, x, ldx, res, ldr, weight, out, ldo, eps);
}

/* Returns -1, touching nothing, if a position lies outside the tables' [0, P). */
static int cpu_rotary(const cpu_kernel_table *t, int bf16, int64_t T, const int64_t *positions,
                      int64_t P, const float *cos_table, const float *sin_table, int64_t D,
                      void *q, int64_t ldq, int64_t nq, void *k, int64_t ldk, int64_t nk) {
    if (!indices_valid(T, positions, P)) return -1;
#pragma omp parallel if (T * (nq + nk) * D >= PAR_MIN_ELEMS)
    t->rotary(bf16, T, positions, cos_table, sin_table, D, q, ldq, nq, k, ldk, nk);
    return 0;
}

static void cpu_silu_and_mul(const cpu_kernel_table *t, int bf16, int64_t T, int64_t F,
                             const void *gu, int64_t ldgu, void *out, int64_t ldo) {
#pragma omp parallel if (T * F >= PAR_MIN_ELEMS)
    t->silu_and_mul(bf16, T, F, gu, ldgu, out, ldo);
}

static void cpu_argmax_rows(const cpu_kernel_table *t, int64_t S, int64_t V, const float *logits,
                            int64_t ld, int64_t *out) {
#pragma omp parallel if (S > 1)
    t->argmax_rows(S, V, logits, ld, out);
}

/* Grammar masks: each of the R rows `rows` of logits [S, V] (fp32, rows ld apart) gets -inf
 * at every token its row of `bitmask` (int32 words, W a row, same row index; bit j of word w
 * allows token 32w + j: xgrammar's layout) refuses. Grammars mostly give whole words of ones
 * (skipped) or zeros (filled), so a row costs a fraction of a pass over its vocabulary:
 * xgrammar's CPU kernel tests every token (0.1 ms a row of 49152 on this CPU). Returns -1,
 * touching nothing, if a row lies outside [0, S). */
static int cpu_mask_rows(int64_t R, const int64_t *rows, int64_t S, int64_t V, float *logits,
                         int64_t ld, const int32_t *bitmask, int64_t W) {
    if (!indices_valid(R, rows, S)) return -1;
    int64_t n = V < 32 * W ? V : 32 * W;
#pragma omp parallel for schedule(static) if (R > 1)
    for (int64_t i = 0; i < R; i++) {
        float *x = logits + rows[i] * ld;
        const uint32_t *words = (const uint32_t *)(bitmask + rows[i] * W);
        for (int64_t w = 0; w * 32 < n; w++) {
            uint32_t bits = words[w];
            int64_t end = w * 32 + 32 < n ? w * 32 + 32 : n;
            if (bits == 0xFFFFFFFFu) continue;
            for (int64_t j = w * 32; j < end; j++)
                if (!(bits >> (j & 31) & 1)) x[j] = -INFINITY;
        }
    }
    return 0;
}

/* Returns -1, touching nothing, if a slot or block index lies outside the cache. */
static int cpu_paged_attention(const cpu_kernel_table *t, int bf16, const cpu_attention_plan *a,
                               const void *q, int64_t ldq, const void *k, const void *v,
                               int64_t ldkv, void *k_cache, void *v_cache, int64_t num_blocks,
                               int64_t H, int64_t KVH, int64_t D, float scale, void *out) {
    if (!kv_indices_valid(a, num_blocks)) return -1;
#pragma omp parallel
    t->paged_attention(bf16, a, q, ldq, k, v, ldkv, k_cache, v_cache, H, KVH, D, scale, out);
    return 0;
}

/* The decoder stack on T tokens (body: forward). Returns -1 for a token id outside the
 * vocabulary, -2 for a position outside the rotary tables, -3 for a slot or block outside the
 * KV cache; nothing is touched then. */
static int cpu_forward(const cpu_kernel_table *t, int bf16, const cpu_model *m, int64_t vocab,
                       int64_t max_position, int64_t num_blocks, int64_t T, const int64_t *ids,
                       const int64_t *positions, const cpu_attention_plan *a,
                       const cpu_buffers *w, void *out) {
    if (!indices_valid(T, ids, vocab)) return -1;
    if (!indices_valid(T, positions, max_position)) return -2;
    if (!kv_indices_valid(a, num_blocks)) return -3;
    t->forward(t->linear, m->act_q8 ? t->linear_q8 : NULL, bf16, m, T, ids, positions, a, w, out);
    return 0;
}

/* The OpenMP threads a parallel region started here would get: torch.set_num_threads's (one
 * runtime, libgomp, serves torch and these kernels). */
static int cpu_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#endif
