/* GGUF's quantized weight blocks as the linear kernels keep them: ISA-independent parts
 * (types, the panel layout and its packing, one row's dequantization). Included by
 * cpu_kernels.h before the per-ISA bodies, whose `qlinear` dequantizes in registers.
 *
 * llama.cpp stores a weight row by row, each row K / 32 blocks of 32 input features:
 *   Q4_0 (18 B): fp16 d, 16 bytes qs; w[i] = d * (q[i] - 8)
 *   Q4_1 (20 B): fp16 d, fp16 m, 16 bytes qs; w[i] = d * q[i] + m
 *   Q8_0 (34 B): fp16 d, 32 int8 qs; w[i] = d * q[i]
 * where the 4-bit q[i] of qs[j] is its low nibble for i = j and its high nibble for i = j + 16;
 * and in super-blocks of 256:
 *   Q4_K (144 B): fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc[8] and mins mn[8], 128 bytes
 *   qs; sub-block s (32 features) is w[i] = (d * sc[s]) * q[i] - dmin * mn[s], its q[i] the
 *   low (s even) or high (s odd) nibbles of qs[32 (s / 2) + i].
 *   Q6_K (210 B): 128 bytes ql (4 low bits), 64 bytes qh (2 high bits), 16 int8 scales sc,
 *   fp16 d; w[e] = (d * sc[e / 16]) * (q[e] - 32).
 * A Q4_K sub-block enters the panels as a Q4_1 block whose scale and min are those fp32
 * products (exact: the oracle rounds them so too), 12 bytes a row instead of 4.5; a Q6_K
 * 32-feature block as a Q8_0 block of q - 32 with two fp32 scales d * sc, one for each 16
 * features (40 bytes a row instead of 26.25).
 *
 * The kernels take the same blocks with 16 rows interleaved, the panels of the dense layout
 * (cpu_kernels.h, pack_panels): a panel is [K/32] blocks of 16 rows, each block their 16
 * scales d (fp16), for Q4_1 their 16 mins m, then the quants in 64-byte chunks g, one 32-bit
 * lane per row holding four consecutive input features: byte 4 r + i of chunk g is
 *   Q4: q[r][4g + i] | q[r][16 + 4g + i] << 4 (g < 4)    Q8_0: q[r][4g + i] (g < 8).
 * A lane shifted right by 8 i (+ 4) and masked is then feature 4g + i (+ 16) of the 16 rows
 * (the fp32 path), and a chunk is what vpdpbusd multiplies by four broadcast int8 inputs (the
 * int8 path). Same bytes as the file (Q4_K: 0.75 bytes a weight instead of 0.56), N padded to
 * 16 with zero blocks. */

/* ggml's type numbers; 0 (F32) stands for a dense weight in the model's dtype. */
enum { QT_DENSE = 0, QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q8_0 = 8, QT_Q4_K = 12, QT_Q6_K = 14 };

#define Q_BLOCK 32 /* input features per panel block */

/* Input features per file block of type qt. */
static inline int64_t q_block_elems(int qt) { return qt == QT_Q4_K || qt == QT_Q6_K ? 256 : 32; }

/* Bytes of one file block of type qt; 0: not a type the kernels run. */
static inline int64_t q_type_bytes(int qt) {
    return qt == QT_Q4_0   ? 18
           : qt == QT_Q4_1 ? 20
           : qt == QT_Q8_0 ? 34
           : qt == QT_Q4_K ? 144
           : qt == QT_Q6_K ? 210
                           : 0;
}

/* Bytes of one panel block (16 rows): scales (fp16; Q4_K's, Q6_K's fp32), mins, quants. */
static inline int64_t q_panel_block_bytes(int qt) {
    return qt == QT_Q4_K ? 384 : qt == QT_Q6_K ? 640 : 16 * q_type_bytes(qt);
}

/* Byte offset of the quants in a panel block (after d, and m for Q4_1 / Q4_K; Q6_K: d0, d1). */
static inline int64_t q_quants_offset(int qt) {
    return qt == QT_Q4_K || qt == QT_Q6_K ? 128 : qt == QT_Q4_1 ? 64 : 32;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13); /* inf, nan */
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalize */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16, round to nearest even, quiet NaNs: torch's cast. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Q4_K sub-block s of the super-block at src into one row r of a panel block (dst). */
static void pack_q4_k_sub(const uint8_t *src, int64_t s, int64_t r, uint8_t *dst) {
    uint16_t h;
    memcpy(&h, src, 2);
    float d = f16_to_f32(h);
    memcpy(&h, src + 2, 2);
    float dmin = f16_to_f32(h);
    const uint8_t *sc = src + 4, *qs = src + 16;
    int scale, mn; /* the 6-bit pairs: llama.cpp's get_scale_min_k4 */
    if (s < 4) {
        scale = sc[s] & 63;
        mn = sc[s + 4] & 63;
    } else {
        scale = (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
        mn = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
    float D = d * (float)scale, M = -(dmin * (float)mn);
    memcpy(dst + r * 4, &D, 4);
    memcpy(dst + 64 + r * 4, &M, 4);
    for (int64_t j = 0; j < 16; j++) {
        int lo = (qs[32 * (s / 2) + j] >> (4 * (s % 2))) & 0xF;
        int hi = (qs[32 * (s / 2) + j + 16] >> (4 * (s % 2))) & 0xF;
        dst[128 + (j / 4) * 64 + r * 4 + j % 4] = (uint8_t)(lo | hi << 4);
    }
}

/* Q6_K 32-feature block t of the super-block at src into one row r of a panel block (dst). */
static void pack_q6_k_block(const uint8_t *src, int64_t t, int64_t r, uint8_t *dst) {
    const uint8_t *ql = src, *qh = src + 128;
    const int8_t *sc = (const int8_t *)(src + 192);
    uint16_t h;
    memcpy(&h, src + 208, 2);
    float d = f16_to_f32(h);
    for (int64_t half = 0; half < 2; half++) {
        float D = d * (float)sc[2 * t + half];
        memcpy(dst + half * 64 + r * 4, &D, 4);
    }
    for (int64_t i = 0; i < 32; i++) {
        int64_t e = 32 * t + i, g = e / 128, k = e % 128;
        int lo = (ql[64 * g + k % 64] >> (4 * (k / 64))) & 0xF;
        int hi = (qh[32 * g + k % 32] >> (2 * (k / 32))) & 3;
        dst[128 + (i / 4) * 64 + r * 4 + i % 4] = (uint8_t)(int8_t)((lo | hi << 4) - 32);
    }
}

/* Packs N rows of file blocks of type qt ([K / block elems] a row, rows ldw bytes apart) into
 * panels. */
static void pack_q_panels(int qt, int64_t N, int64_t K, const uint8_t *w, int64_t ldw,
                          uint8_t *out) {
    int64_t nb = K / Q_BLOCK, tb = q_type_bytes(qt), pb = q_panel_block_bytes(qt);
    int64_t scales = qt == QT_Q4_1 ? 2 : 1, nq = qt == QT_Q8_0 ? 32 : 16;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < (N + 15) / 16; p++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *dst = out + (p * nb + b) * pb;
            memset(dst, 0, pb);
            for (int64_t r = 0; r < 16 && p * 16 + r < N; r++) {
                const uint8_t *row = w + (p * 16 + r) * ldw;
                if (qt == QT_Q4_K || qt == QT_Q6_K) {
                    (qt == QT_Q4_K ? pack_q4_k_sub : pack_q6_k_block)(row + b / 8 * tb, b % 8, r,
                                                                       dst);
                    continue;
                }
                const uint8_t *src = row + b * tb, *qs = src + scales * 2;
                uint8_t *qd = dst + scales * 32;
                for (int64_t s = 0; s < scales; s++) memcpy(dst + s * 32 + r * 2, src + s * 2, 2);
                for (int64_t j = 0; j < nq; j++) /* file byte j: features j (, j + 16) */
                    qd[(j / 4) * 64 + r * 4 + j % 4] = qs[j];
            }
        }
    }
}

/* Row n of a packed [N, K] weight of type qt, dequantized into out (fp32 or bf16): the
 * embedding lookup of a model whose embedding is its quantized LM head. */
static void q_dequant_row(int qt, int64_t K, const uint8_t *wp, int64_t n, int bf16, void *out) {
    int64_t nb = K / Q_BLOCK, pb = q_panel_block_bytes(qt), r = n % 16;
    const uint8_t *panel = wp + (n / 16) * nb * pb;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = panel + b * pb, *qs = blk + q_quants_offset(qt);
        uint16_t h;
        float d, m = 0.0f;
        if (qt == QT_Q4_K || qt == QT_Q6_K) { /* Q6_K: d0 and d1 */
            memcpy(&d, blk + r * 4, 4);
            memcpy(&m, blk + 64 + r * 4, 4);
        } else {
            memcpy(&h, blk + r * 2, 2);
            d = f16_to_f32(h);
        }
        if (qt == QT_Q4_1) {
            memcpy(&h, blk + 32 + r * 2, 2);
            m = f16_to_f32(h);
        }
        for (int64_t i = 0; i < Q_BLOCK; i++) {
            float v;
            if (qt == QT_Q8_0 || qt == QT_Q6_K) {
                float di = qt == QT_Q6_K && i >= 16 ? m : d;
                v = di * (float)(int8_t)qs[(i / 4) * 64 + r * 4 + i % 4];
            } else {
                int j = i % 16, q = (qs[(j / 4) * 64 + r * 4 + j % 4] >> (i < 16 ? 0 : 4)) & 0xF;
                v = qt == QT_Q4_0 ? d * (float)(q - 8) : d * (float)q + m;
            }
            int64_t k = b * Q_BLOCK + i;
            if (bf16)
                ((uint16_t *)out)[k] = f32_to_bf16(v);
            else
                ((float *)out)[k] = v;
        }
    }
}
