/* The decode step through one transformer block (palmchat_block_bf16), written once for every instruction set:
   decode_bf16.c (AVX512-BF16) and decode_avx2.c (AVX2 + FMA) each include this file once, after defining

       KERNEL                                   the function attribute of their instruction set
       rows(x, W, b, y, M, N, K, n0, n1)        rows n0..n1-1 of y (M, N) = x (M, K) @ W^T (+ b), W bf16, M <= 4
       rows_q8(x, W, scale, b, y, M, N, K, n0, n1)   the same with W int8 and a scale per row
       rows_q4(x, W, scale, b, y, M, N, K, n0, n1)   the same with W 4-bit and an fp16 scale per block of 32
       dot_bf16(a, b, D) -> float               sum of a[i] * b[i] over D bf16 pairs, in fp32
       axpy_bf16(acc, weight, v, D)             acc[d] += weight * v[d] for D bf16 values, fp32 accumulators

   so that the block's arithmetic and roundings are the same text on every path (numerics: decode_bf16.c's top
   comment). Each C file is its own shared library, so the static names here never meet. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 4  /* rows (sequences) one call takes */
#define Q4_BLOCK 32 /* elements per scale of a 4-bit weight */

typedef uint16_t bf16;

static inline float to_f32(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) {  /* round to nearest even, as c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static inline float round_bf16(float f) { return to_f32(to_bf16(f)); }

/* defined by the including file, for its instruction set (see above) */
KERNEL static inline __attribute__((always_inline)) void
rows(const bf16 *x, const bf16 *W, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K, int64_t n0, int64_t n1);
KERNEL static inline __attribute__((always_inline)) void
rows_q8(const bf16 *x, const int8_t *W, const bf16 *scale, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K,
        int64_t n0, int64_t n1);
KERNEL static inline __attribute__((always_inline)) void
rows_q4(const bf16 *x, const uint8_t *W, const uint16_t *scale, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K,
        int64_t n0, int64_t n1);
KERNEL static inline float dot_bf16(const bf16 *a, const bf16 *b, int64_t D);
KERNEL static inline void axpy_bf16(float *acc, float weight, const bf16 *v, int64_t D);

/* ------------------------------------------------------------------------------------------------------------
   The gemv. Weights are bf16, or int8 with one bf16 scale per output row (kernels/cpu_linear.Int8Linear: W ~ q *
   scale, |q| <= 127), half the bytes, so a decode step that streams them from memory takes less time. An int8
   row's sum of q * x is exact products added in fp32 (an int8 times a bf16 fits fp32's mantissa), times its
   scale, rounded to bf16; a bias is added after that rounding and the sum rounded again: Int8Linear's PyTorch
   path, whose torch._weight_int8pack_mm scales the fp32 sum and whose bias is a separate bf16 add. A bf16 row's
   bias joins the fp32 sum before its one rounding, as nn.Linear's does.
   ------------------------------------------------------------------------------------------------------------ */

static inline bf16 finish_q8(float sum, const bf16 *scale, const bf16 *b, int64_t n) {
    const float scaled = sum * to_f32(scale[n]);
    return b ? to_bf16(round_bf16(scaled) + to_f32(b[n])) : to_bf16(scaled);
}

/* x's M rows widened to fp32 once per call (exact: a bf16 is the upper half of the fp32 of the same value), in a
   buffer of this thread's that grows as needed and lives as long as the thread (OpenMP's pool keeps its threads).
   NULL when out of memory. */
static float *widened_rows(const bf16 *x, int M, int64_t K) {
    static __thread float *buffer;
    static __thread int64_t capacity;
    if (M * K > capacity) {
        float *grown = realloc(buffer, (size_t)(M * K) * sizeof(float));
        if (!grown) return NULL;
        buffer = grown;
        capacity = M * K;
    }
    for (int64_t i = 0; i < M * K; i++) buffer[i] = to_f32(x[i]);
    return buffer;
}

/* rows_q8 without a buffer for x (out of memory): the same sums, one product at a time */
KERNEL static void rows_q8_unbuffered(const bf16 *x, const int8_t *W, const bf16 *scale, const bf16 *b, bf16 *y,
                                      int M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++)
        for (int m = 0; m < M; m++) {
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++) sum = fmaf((float)W[n * K + k], to_f32(x[m * K + k]), sum);
            y[m * N + n] = finish_q8(sum, scale, b, n);
        }
}

/* How far ahead of their loads the quantized gemvs ask for their weights: with the hardware prefetchers alone a core
   read int8 weights more slowly through 16-byte loads than the bf16 gemv reads its weights through 64-byte ones
   (benchmarks/README.md, bench_byom.py); the bf16 gemv did not gain from it. */
#define Q8_PREFETCH_BYTES 2048
#define Q4_PREFETCH_BYTES 4096  /* the same for rows_q4, measured likewise */

/* 4-bit weights (kernels/cpu_linear.Int4Linear), llama.cpp's Q4_0 layout: row n is K/32 blocks of 16 bytes, byte j
   of a block holding its element j in the low nibble and element j + 16 in the high one; a nibble q stands for
   (q - 8) * d, d the block's fp16 scale (scale[n * K/32 + block]). A row's sum over its blocks of d times the block's
   exact sum of (q - 8) * x is rounded to bf16; a bias is added after that rounding, as for int8. K % 32 == 0. */
static inline bf16 finish_q4(float sum, const bf16 *b, int64_t n) {
    return b ? to_bf16(round_bf16(sum) + to_f32(b[n])) : to_bf16(sum);
}

/* rows_q4 without a buffer for x (out of memory): the same sums, one product at a time */
KERNEL static void rows_q4_unbuffered(const bf16 *x, const uint8_t *W, const uint16_t *scale, const bf16 *b,
                                      bf16 *y, int M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int64_t blocks = K / Q4_BLOCK;
    for (int64_t n = n0; n < n1; n++)
        for (int m = 0; m < M; m++) {
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const uint8_t byte = W[n * (K / 2) + k / Q4_BLOCK * 16 + k % 16];
                const int q = (k % Q4_BLOCK < 16 ? byte & 15 : byte >> 4) - 8;
                sum = fmaf((float)q * _cvtsh_ss(scale[n * blocks + k / Q4_BLOCK]), to_f32(x[m * K + k]), sum);
            }
            y[m * N + n] = finish_q4(sum, b, n);
        }
}

/* This thread's contiguous band of rows of W (int8 when it has scales, 4-bit when q4 is set too), so that each
   thread streams its own part of the weight: in one pass for up to MAX_ROWS rows of x, else in tiles of 16 rows,
   over each of which the rows of x (a batch of decode steps) go in groups of MAX_ROWS while the tile stays in L1,
   so W is still read from memory once. */
KERNEL static void gemv_band(const bf16 *x, const void *W, const void *scale, int q4, const bf16 *b, bf16 *y,
                             int M, int64_t N, int64_t K) {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads, tile = M <= MAX_ROWS ? n1 - n0 : 16;
    const bf16 *w16 = W;
    const int8_t *w8 = W;
    for (int64_t n = n0; n < n1; n += tile) {
        const int64_t end = n + tile < n1 ? n + tile : n1;
        for (int g = 0; g < M; g += MAX_ROWS) {
            const bf16 *xg = x + g * K;
            bf16 *yg = y + g * N;
            #define ROWS(m) (q4 ? rows_q4(xg, (const uint8_t *)W, scale, b, yg, m, N, K, n, end) \
                             : scale ? rows_q8(xg, w8, scale, b, yg, m, N, K, n, end) \
                                     : rows(xg, w16, b, yg, m, N, K, n, end))
            switch (M - g) {
                case 1: ROWS(1); break;
                case 2: ROWS(2); break;
                case 3: ROWS(3); break;
                default: ROWS(4); break;
            }
            #undef ROWS
        }
    }
}

/* y (M, N) = x (M, K) @ W (N, K)^T (+ b), all bf16 and contiguous, M >= 1 rows (a decode step's few; cpu_linear.py
   sends more to oneDNN or fp32 products, which run faster once the arithmetic outweighs reading W). The OpenMP
   threads are the same runtime and thread count as PyTorch's. */
KERNEL void palmchat_linear_bf16(const bf16 *x, const bf16 *W, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K) {
    #pragma omp parallel
    gemv_band(x, W, NULL, 0, b, y, M, N, K);
}

/* y (M, N) = x (M, K) @ (W (N, K) * scale (N,))^T (+ b): Int8Linear's forward for a few rows (cpu_linear.py). */
KERNEL void palmchat_linear_q8(const bf16 *x, const int8_t *W, const bf16 *scale, const bf16 *b, bf16 *y, int M,
                               int64_t N, int64_t K) {
    #pragma omp parallel
    gemv_band(x, W, scale, 0, b, y, M, N, K);
}

/* y (M, N) = x (M, K) @ W^T (+ b) with W 4-bit (N, K/2 bytes) and scale (N, K/32) fp16: Int4Linear's forward for a
   few rows (cpu_linear.py). */
KERNEL void palmchat_linear_q4(const bf16 *x, const uint8_t *W, const uint16_t *scale, const bf16 *b, bf16 *y, int M,
                               int64_t N, int64_t K) {
    #pragma omp parallel
    gemv_band(x, W, scale, 1, b, y, M, N, K);
}

/* out (rows, K) = the 4-bit W's rows (N, K/2 bytes) with their fp16 scales (N, K/32), dequantized: (q - 8) * d, exact
   in fp32 (out_bf16 0: float *out) or rounded to bf16 (1: bf16 *out, as torch rounds). For the products of many rows
   at once (a prefill), which multiply the dequantized weight a band of rows at a time (cpu_linear.banded_linear). */
KERNEL void palmchat_dequantize_q4(const uint8_t *W, const uint16_t *scale, void *out, int64_t rows, int64_t K,
                                   int out_bf16) {
    const int64_t blocks = K / Q4_BLOCK;
    #pragma omp parallel for
    for (int64_t n = 0; n < rows; n++)
        for (int64_t i = 0; i < blocks; i++) {
            const float d = _cvtsh_ss(scale[n * blocks + i]);
            const uint8_t *w = W + n * (K / 2) + 16 * i;
            float v[Q4_BLOCK];
            for (int j = 0; j < 16; j++) {
                v[j] = (float)((w[j] & 15) - 8) * d;
                v[j + 16] = (float)((w[j] >> 4) - 8) * d;
            }
            const int64_t at = n * K + Q4_BLOCK * i;
            if (out_bf16)
                for (int j = 0; j < Q4_BLOCK; j++) ((bf16 *)out)[at + j] = to_bf16(v[j]);
            else
                memcpy((float *)out + at, v, sizeof v);
        }
}

/* ------------------------------------------------------------------------------------------------------------
   The block. Shapes: M rows, C model dim, H query heads, Hkv key/value heads, D head dim, F SwiGLU hidden size.
   ------------------------------------------------------------------------------------------------------------ */

typedef struct {  /* mirrored by fused_block.py's BlockCall */
    int64_t rows, dim, n_heads, n_kv_heads, head_dim, ffn_hidden;
    int64_t sequential;  /* 0: PaLM parallel block; 1: sequential (Llama) block */
    int64_t rmsnorm;     /* 0: LayerNorm without bias; 1: RMSNorm */
    float eps;
    const bf16 *x;       /* (M, C) the block's input */
    bf16 *y;             /* (M, C) its output */
    const bf16 *norm;    /* (C,) the pre-norm (parallel) or attention norm (sequential) weight */
    const bf16 *ff_norm; /* (C,) sequential only */
    /* the linears' weights: bf16, or int8 with a scale per row (s_in ... s_ff_out below), or 4-bit (q4 below) */
    const void *w_in;    /* parallel: (H*D + 2*Hkv*D + 2F, C) q, k, v, gate, up; sequential: (H*D + 2*Hkv*D, C) */
    const void *w_gate_up;  /* sequential only: (2F, C) */
    const void *w_attn_out; /* (C, H*D) */
    const void *w_ff_out;   /* (C, F) */
    bf16 *k_cache, *v_cache;  /* this layer's; element [m, h, s, d] at m*row_stride + h*head_stride + s*slot_stride + d */
    int64_t row_stride, head_stride, slot_stride;
    const int64_t *positions; /* (M,) the new token's position in each row = its cache slot */
    const bf16 *cos, *sin;    /* (M, D) rotary tables at those positions: [cos, cos] and [-sin, sin] */
    const bf16 *b_in;         /* sequential only: the q, k, v biases (Qwen2), or NULL */
    /* the per-row scales of w_in, w_gate_up, w_attn_out, w_ff_out when that weight is int8; NULL: it is bf16 */
    const bf16 *s_in, *s_gate_up, *s_attn_out, *s_ff_out;
    /* bit i set: weight i (w_in, w_gate_up, w_attn_out, w_ff_out) is 4-bit and its s_* its fp16 block scales */
    int64_t q4;
} Block;

KERNEL static void norm_row(const Block *p, const bf16 *weight, const bf16 *x, bf16 *out) {
    const int64_t C = p->dim;
    float mean = 0, var = 0;
    if (!p->rmsnorm) {
        for (int64_t i = 0; i < C; i++) mean += to_f32(x[i]);
        mean /= C;
    }
    for (int64_t i = 0; i < C; i++) {
        float d = to_f32(x[i]) - mean;
        var += d * d;
    }
    const float scale = 1.0f / sqrtf(var / C + p->eps);
    for (int64_t i = 0; i < C; i++) out[i] = to_bf16((to_f32(x[i]) - mean) * scale * to_f32(weight[i]));
}

/* Rotate-half rotary embedding of one head (model/rope.py's apply_rotary): [x1, x2] * [cos, cos] + [x2, x1] * [-sin, sin],
   each product and the sum rounded to bf16. */
KERNEL static void rotary(const bf16 *x, const bf16 *cos, const bf16 *sin, int64_t D, bf16 *out) {
    for (int64_t d = 0; d < D; d++) {
        float swapped = to_f32(x[d < D / 2 ? d + D / 2 : d - D / 2]);
        out[d] = to_bf16(round_bf16(to_f32(x[d]) * to_f32(cos[d])) + round_bf16(swapped * to_f32(sin[d])));
    }
}

/* One query head of row m over its K/V head's cached positions 0..position -> out (D,). */
KERNEL static void attend(const Block *p, int64_t m, const bf16 *q, int64_t kv_head, float *scores, bf16 *out) {
    const int64_t D = p->head_dim, S = p->positions[m] + 1;
    const bf16 *k = p->k_cache + m * p->row_stride + kv_head * p->head_stride;
    const bf16 *v = p->v_cache + m * p->row_stride + kv_head * p->head_stride;
    const float scale = 1.0f / sqrtf((float)D);
    float max = -INFINITY, sum = 0, acc[D];
    for (int64_t s = 0; s < S; s++) {
        scores[s] = dot_bf16(q, k + s * p->slot_stride, D) * scale;
        max = fmaxf(max, scores[s]);
    }
    for (int64_t d = 0; d < D; d++) acc[d] = 0;
    for (int64_t s = 0; s < S; s++) {
        float e = expf(scores[s] - max);
        sum += e;
        axpy_bf16(acc, round_bf16(e), v + s * p->slot_stride, D);
    }
    for (int64_t d = 0; d < D; d++) out[d] = to_bf16(acc[d] / sum);
}

/* y = x @ W^T for this thread's band, y rounded to bf16 (the M rows of x contiguous, K wide); W is int8 when it has
   scales S (4-bit when bit `bit` of p->q4 is set). */
#define GEMV(x, W, S, bit, b, y, N, K) gemv_band((x), (W), (S), (int)((p->q4 >> (bit)) & 1), (b), (y), (int)M, (N), (K))

/* Returns 0, or 1 when out of memory (nothing written then). */
KERNEL int palmchat_block_bf16(const Block *p) {
    const int64_t M = p->rows, C = p->dim, H = p->n_heads, Hkv = p->n_kv_heads, D = p->head_dim, F = p->ffn_hidden;
    const int64_t HD = H * D, QKV = (H + 2 * Hkv) * D, IN = p->sequential ? QKV : QKV + 2 * F;
    int64_t longest = 0;  /* keys in the longest row: the size of the score buffers */
    for (int64_t m = 0; m < M; m++) longest = p->positions[m] + 1 > longest ? p->positions[m] + 1 : longest;

    /* scratch, bf16: normed (M, C), projected (M, IN), attention (M, HD), swiglu (M, F), attn_proj (M, C),
       ff_proj (M, C), residual (M, C) */
    bf16 *scratch = malloc(sizeof(bf16) * M * (C + IN + HD + F + 3 * C));
    bf16 *normed = scratch, *projected = normed + M * C, *attn = projected + M * IN, *swiglu = attn + M * HD;
    bf16 *attn_proj = swiglu + M * F, *ff_proj = attn_proj + M * C, *residual = ff_proj + M * C;
    bf16 *gate_up = p->sequential ? malloc(sizeof(bf16) * M * 2 * F) : NULL;
    float *scores = malloc(sizeof(float) * longest * omp_get_max_threads());  /* one row of scores per thread */
    if (!scratch || (p->sequential && !gate_up) || !scores) {
        free(scratch), free(gate_up), free(scores);
        return 1;
    }

    #pragma omp parallel
    {
        float *my_scores = scores + longest * omp_get_thread_num();
        bf16 q[D];

        #pragma omp for
        for (int64_t m = 0; m < M; m++) norm_row(p, p->norm, p->x + m * C, normed + m * C);
        GEMV(normed, p->w_in, p->s_in, 0, p->b_in, projected, IN, C);
        #pragma omp barrier

        /* the new keys (rotated) and values into the cache */
        #pragma omp for
        for (int64_t i = 0; i < M * Hkv; i++) {
            const int64_t m = i / Hkv, h = i % Hkv, slot = p->positions[m];
            const bf16 *k = projected + m * IN + HD + h * D, *v = k + Hkv * D;
            bf16 *k_slot = p->k_cache + m * p->row_stride + h * p->head_stride + slot * p->slot_stride;
            bf16 *v_slot = p->v_cache + m * p->row_stride + h * p->head_stride + slot * p->slot_stride;
            rotary(k, p->cos + m * D, p->sin + m * D, D, k_slot);
            memcpy(v_slot, v, sizeof(bf16) * D);
        }
        /* query head h reads key/value head h / (H / Hkv), as the grouped layout of model/attention.py */
        #pragma omp for
        for (int64_t i = 0; i < M * H; i++) {
            const int64_t m = i / H, h = i % H;
            rotary(projected + m * IN + h * D, p->cos + m * D, p->sin + m * D, D, q);
            attend(p, m, q, h / (H / Hkv), my_scores, attn + m * HD + h * D);
        }

        if (!p->sequential) {  /* y = x + attn_out(attention) + ff_out(silu(gate) * up) */
            #pragma omp for
            for (int64_t i = 0; i < M * F; i++) {
                const bf16 *gate = projected + (i / F) * IN + QKV + i % F, *up = gate + F;
                float g = to_f32(*gate);
                swiglu[i] = to_bf16(round_bf16(g / (1.0f + expf(-g))) * to_f32(*up));
            }
            GEMV(attn, p->w_attn_out, p->s_attn_out, 2, NULL, attn_proj, C, HD);
            GEMV(swiglu, p->w_ff_out, p->s_ff_out, 3, NULL, ff_proj, C, F);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * C; i++)
                p->y[i] = to_bf16(round_bf16(to_f32(p->x[i]) + to_f32(attn_proj[i])) + to_f32(ff_proj[i]));
        } else {  /* h = x + attn_out(attention); y = h + ff_out(silu(gate) * up) of ff_norm(h) */
            GEMV(attn, p->w_attn_out, p->s_attn_out, 2, NULL, attn_proj, C, HD);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * C; i++) residual[i] = to_bf16(to_f32(p->x[i]) + to_f32(attn_proj[i]));
            #pragma omp for
            for (int64_t m = 0; m < M; m++) norm_row(p, p->ff_norm, residual + m * C, normed + m * C);
            GEMV(normed, p->w_gate_up, p->s_gate_up, 1, NULL, gate_up, 2 * F, C);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * F; i++) {
                const bf16 *gate = gate_up + (i / F) * 2 * F + i % F, *up = gate + F;
                float g = to_f32(*gate);
                swiglu[i] = to_bf16(round_bf16(g / (1.0f + expf(-g))) * to_f32(*up));
            }
            GEMV(swiglu, p->w_ff_out, p->s_ff_out, 3, NULL, ff_proj, C, F);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * C; i++) p->y[i] = to_bf16(to_f32(residual[i]) + to_f32(ff_proj[i]));
        }
    }
    free(scratch), free(gate_up), free(scores);
    return 0;
}
