/* bf16 decode steps on a CPU with AVX512-BF16: a streaming gemv, and one whole transformer block per call.

   1. palmchat_linear_bf16: y = x @ W^T (+ b) for 1-4 rows. A decode step reads every weight once per token, so its
      linears are bound by memory bandwidth. oneDNN's packed kernel reads its blocked layout as several short
      interleaved streams, which the hardware prefetchers follow poorly: ~17 GB/s from DRAM on a 2-core AMD EPYC
      (Zen 4) where a plain streaming read gets ~35 GB/s. Here each thread walks its rows of W from start to end in
      memory order, one stream, and reaches ~30 GB/s there.
   2. palmchat_block_bf16: a decode step (1-4 sequences, one new token each) through one PaLM parallel block or
      one sequential (Llama) block: norm, input projection, rotary, KV-cache write, attention over the cache,
      SwiGLU, output projections and residual, in one parallel region. In PyTorch the same step is ~25 small ops
      per block, whose dispatch costs more than the block's arithmetic (benchmarks/README.md, bench_foundation).

   Numerics follow the PyTorch bf16 path op by op (palmchat/model/transformer.py run in bf16): products accumulated in
   fp32, and a rounding to bf16 wherever PyTorch stores a bf16 tensor (after the norm, each projection, each
   rotary product and sum, silu, the SwiGLU product, each residual sum; attention as PyTorch's CPU flash kernel:
   fp32 scores and softmax, probabilities rounded to bf16 for the product with V). Only the order of fp32
   additions differs. Used by palmchat/kernels/cpu_linear.py and palmchat/inference/fused_block.py; built by setup.py (optional:
   without it the PyTorch path serves everything). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 4
#define BF16_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

typedef uint16_t bf16;

int palmchat_linear_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

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

/* ------------------------------------------------------------------------------------------------------------
   The gemv
   ------------------------------------------------------------------------------------------------------------ */

/* Rows n0..n1-1 of y (M, N) = x (M, K) @ W (N, K)^T + b (N,) (b may be NULL). Inlined with M a constant, so the
   accumulators stay in registers: two per input row, so that consecutive VDPBF16PS do not wait on each other. The
   bias joins the fp32 sum before its one rounding to bf16, as nn.Linear's does. */
BF16_KERNEL static inline __attribute__((always_inline)) void
rows(const bf16 *x, const bf16 *W, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int64_t full = K / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (K - full)) - 1);
    for (int64_t n = n0; n < n1; n++) {
        const bf16 *w = W + n * K;
        __m512 acc[MAX_ROWS][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
            for (int m = 0; m < M; m++) {
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
                acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32));
            }
        }
        for (; k < full; k += 32) {
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
            for (int m = 0; m < M; m++)
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_loadu_si512(x + m * K + k));
        }
        if (tail) {  /* the last K % 32 elements; masked-off lanes load as zeros */
            __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + k);
            for (int m = 0; m < M; m++)
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + m * K + k));
        }
        const float bias = b ? to_f32(b[n]) : 0.0f;
        for (int m = 0; m < M; m++)
            y[m * N + n] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + bias);
    }
}

/* This thread's contiguous band of rows n0..n1-1 of W: each thread streams its own part of the weight. */
BF16_KERNEL static void gemv_band(const bf16 *x, const bf16 *W, const bf16 *b, bf16 *y, int M, int64_t N,
                                  int64_t K) {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads;
    switch (M) {
        case 1: rows(x, W, b, y, 1, N, K, n0, n1); break;
        case 2: rows(x, W, b, y, 2, N, K, n0, n1); break;
        case 3: rows(x, W, b, y, 3, N, K, n0, n1); break;
        default: rows(x, W, b, y, 4, N, K, n0, n1); break;
    }
}

/* y (M, N) = x (M, K) @ W (N, K)^T, all bf16 and contiguous, 1 <= M <= MAX_ROWS. The OpenMP threads are the
   same runtime and thread count as PyTorch's. */
BF16_KERNEL void palmchat_linear_bf16(const bf16 *x, const bf16 *W, const bf16 *b, bf16 *y, int M, int64_t N,
                                      int64_t K) {
    #pragma omp parallel
    gemv_band(x, W, b, y, M, N, K);
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
    const bf16 *w_in;    /* parallel: (H*D + 2*Hkv*D + 2F, C) q, k, v, gate, up; sequential: (H*D + 2*Hkv*D, C) */
    const bf16 *w_gate_up;  /* sequential only: (2F, C) */
    const bf16 *w_attn_out; /* (C, H*D) */
    const bf16 *w_ff_out;   /* (C, F) */
    bf16 *k_cache, *v_cache;  /* this layer's; element [m, h, s, d] at m*row_stride + h*head_stride + s*slot_stride + d */
    int64_t row_stride, head_stride, slot_stride;
    const int64_t *positions; /* (M,) the new token's position in each row = its cache slot */
    const bf16 *cos, *sin;    /* (M, D) rotary tables at those positions: [cos, cos] and [-sin, sin] */
    const bf16 *b_in;         /* sequential only: the q, k, v biases (Qwen2), or NULL */
} Block;

BF16_KERNEL static void norm_row(const Block *p, const bf16 *weight, const bf16 *x, bf16 *out) {
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
BF16_KERNEL static void rotary(const bf16 *x, const bf16 *cos, const bf16 *sin, int64_t D, bf16 *out) {
    for (int64_t d = 0; d < D; d++) {
        float swapped = to_f32(x[d < D / 2 ? d + D / 2 : d - D / 2]);
        out[d] = to_bf16(round_bf16(to_f32(x[d]) * to_f32(cos[d])) + round_bf16(swapped * to_f32(sin[d])));
    }
}

/* sum of a[i] * b[i] over D bf16 pairs, in fp32 */
BF16_KERNEL static inline float dot_bf16(const bf16 *a, const bf16 *b, int64_t D) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
        const __mmask32 lanes = D - d >= 32 ? (__mmask32)-1 : (__mmask32)((1u << (D - d)) - 1);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(lanes, a + d),
                               (__m512bh)_mm512_maskz_loadu_epi16(lanes, b + d));
    }
    return _mm512_reduce_add_ps(acc);
}

/* acc[d] += weight * v[d] for D bf16 values, fp32 accumulators */
BF16_KERNEL static inline void axpy_bf16(float *acc, float weight, const bf16 *v, int64_t D) {
    const __m512 w = _mm512_set1_ps(weight);
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 lanes = D - d >= 16 ? (__mmask16)-1 : (__mmask16)((1u << (D - d)) - 1);
        __m512 values = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, v + d)), 16));
        _mm512_mask_storeu_ps(acc + d, lanes, _mm512_fmadd_ps(w, values, _mm512_maskz_loadu_ps(lanes, acc + d)));
    }
}

/* One query head of row m over its K/V head's cached positions 0..position -> out (D,). */
BF16_KERNEL static void attend(const Block *p, int64_t m, const bf16 *q, int64_t kv_head, float *scores, bf16 *out) {
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

/* y = x @ W^T for this thread's band, y rounded to bf16 (the M rows of x contiguous, K wide). */
#define GEMV(x, W, b, y, N, K) gemv_band((x), (W), (b), (y), (int)M, (N), (K))

/* Returns 0, or 1 when out of memory (nothing written then). */
BF16_KERNEL int palmchat_block_bf16(const Block *p) {
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
        GEMV(normed, p->w_in, p->b_in, projected, IN, C);
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
            GEMV(attn, p->w_attn_out, NULL, attn_proj, C, HD);
            GEMV(swiglu, p->w_ff_out, NULL, ff_proj, C, F);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * C; i++)
                p->y[i] = to_bf16(round_bf16(to_f32(p->x[i]) + to_f32(attn_proj[i])) + to_f32(ff_proj[i]));
        } else {  /* h = x + attn_out(attention); y = h + ff_out(silu(gate) * up) of ff_norm(h) */
            GEMV(attn, p->w_attn_out, NULL, attn_proj, C, HD);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * C; i++) residual[i] = to_bf16(to_f32(p->x[i]) + to_f32(attn_proj[i]));
            #pragma omp for
            for (int64_t m = 0; m < M; m++) norm_row(p, p->ff_norm, residual + m * C, normed + m * C);
            GEMV(normed, p->w_gate_up, NULL, gate_up, 2 * F, C);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * F; i++) {
                const bf16 *gate = gate_up + (i / F) * 2 * F + i % F, *up = gate + F;
                float g = to_f32(*gate);
                swiglu[i] = to_bf16(round_bf16(g / (1.0f + expf(-g))) * to_f32(*up));
            }
            GEMV(swiglu, p->w_ff_out, NULL, ff_proj, C, F);
            #pragma omp barrier
            #pragma omp for
            for (int64_t i = 0; i < M * C; i++) p->y[i] = to_bf16(to_f32(residual[i]) + to_f32(ff_proj[i]));
        }
    }
    free(scratch), free(gate_up), free(scores);
    return 0;
}
