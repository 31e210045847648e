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
      Its code is decode_block.h, shared with decode_avx2.c (the same two entry points on AVX2 + FMA); this file
      supplies the AVX512-BF16 gemv, dot product and axpy it is written in.
   3. palmchat_linear_q8 and palmchat_linear_q4: the gemv with int8 weights and a scale per row, or 4-bit weights
      and a scale per block of 32 (decode_block.h); blocks take them too.

   Numerics follow the PyTorch bf16 path op by op (palmchat/model/transformer.py run in bf16): products accumulated in
   fp32, and a rounding to bf16 wherever PyTorch stores a bf16 tensor (after the norm, each projection, each
   rotary product and sum, silu, the SwiGLU product, each residual sum; attention as PyTorch's CPU flash kernel:
   fp32 scores and softmax, probabilities rounded to bf16 for the product with V). Only the order of fp32
   additions differs. Used by palmchat/kernels/cpu_linear.py (which picks this file or decode_avx2.c per CPU) and
   palmchat/inference/fused_block.py; built by setup.py (optional: without it the PyTorch path serves everything). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BF16_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")))
#define KERNEL BF16_KERNEL

#include "decode_block.h"

int palmchat_linear_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

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

/* Rows n0..n1-1 of y = x @ (W * scale)^T (+ b) with int8 W (decode_block.h's int8 section). x is widened to fp32
   once per call; each 16 int8 are sign-extended to 32 bits and converted to fp32 (exact), and fp32 FMAs sum the
   exact products, four chains in flight per row. Three vector instructions per 16 weights, so that on a core that
   streams ~10 GB/s the int8 weights, not the widening, set the pace (widening x's bf16 per weight as well cost
   twice as many, more than a core's share of memory bandwidth takes). */
BF16_KERNEL static inline __attribute__((always_inline)) void
rows_q8(const bf16 *x, const int8_t *W, const bf16 *scale, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K,
        int64_t n0, int64_t n1) {
    const float *xf = widened_rows(x, M, K);
    if (!xf) {
        rows_q8_unbuffered(x, W, scale, b, y, M, N, K, n0, n1);
        return;
    }
    const int64_t full = K / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (K - full)) - 1);
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *w = W + n * K;
        __m512 acc[MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int a = 0; a < 4; a++) acc[m][a] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
            _mm_prefetch((const char *)(w + k) + Q8_PREFETCH_BYTES, _MM_HINT_T0);
            for (int c = 0; c < 4; c++) {
                const __m512 w16 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128((const __m128i *)(w + k + 16 * c))));
                for (int m = 0; m < M; m++)
                    acc[m][c] = _mm512_fmadd_ps(w16, _mm512_loadu_ps(xf + m * K + k + 16 * c), acc[m][c]);
            }
        }
        for (; k < K; k += 16) {  /* whole chunks of 16 after the steps, then the last K % 16 (masked: zeros) */
            const __mmask16 lanes = k < full ? (__mmask16)-1 : tail;
            const __m512 w16 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes, w + k)));
            for (int m = 0; m < M; m++)
                acc[m][0] = _mm512_fmadd_ps(w16, _mm512_maskz_loadu_ps(lanes, xf + m * K + k), acc[m][0]);
        }
        for (int m = 0; m < M; m++) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
            y[m * N + n] = finish_q8(_mm512_reduce_add_ps(sum), scale, b, n);
        }
    }
}

/* x's M rows rearranged for rows_q4, in a buffer of this thread's (as widened_rows'): per pair of blocks A, B of 32,
   the 64 bf16 A0-15 B0-15 A16-31 B16-31 (a last odd block as it is), then, per pair, the 16 fp32 lanes of
   VDPBF16PS of those against 136s (a last odd block: its 8). NULL when out of memory. */
BF16_KERNEL static const bf16 *q4_rows(const bf16 *x, int M, int64_t K, const float **offsets) {
    static __thread void *buffer;
    static __thread int64_t capacity;
    const int64_t blocks = K / Q4_BLOCK;
    const int64_t size = M * (K * (int64_t)sizeof(bf16) + blocks * 8 * (int64_t)sizeof(float));
    if (size > capacity) {
        void *grown = realloc(buffer, (size_t)size);
        if (!grown) return NULL;
        buffer = grown;
        capacity = size;
    }
    bf16 *xs = buffer;
    float *sums = (float *)(xs + M * K);
    const __m512bh offset = (__m512bh)_mm512_set1_epi16((short)to_bf16(136.0f));
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < blocks; i += 2) {
            const bf16 *a = x + m * K + Q4_BLOCK * i;
            bf16 *out = xs + m * K + Q4_BLOCK * i;
            float *sum = sums + (m * blocks + i) * 8;
            if (i + 1 < blocks) {
                const __m512i low = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                                                       _mm256_loadu_si256((const __m256i *)(a + 32)), 1);
                const __m512i high = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + 16))),
                    _mm256_loadu_si256((const __m256i *)(a + 48)), 1);
                _mm512_storeu_si512(out, low);
                _mm512_storeu_si512(out + 32, high);
                _mm512_storeu_ps(sum, _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), offset, (__m512bh)low),
                                                       offset, (__m512bh)high));
            } else {
                const __m256bh offset8 = (__m256bh)_mm512_castsi512_si256((__m512i)offset);
                const __m256i low = _mm256_loadu_si256((const __m256i *)a);
                const __m256i high = _mm256_loadu_si256((const __m256i *)(a + 16));
                _mm256_storeu_si256((__m256i *)out, low);
                _mm256_storeu_si256((__m256i *)(out + 16), high);
                _mm256_storeu_ps(sum, _mm256_dpbf16_ps(_mm256_dpbf16_ps(_mm256_setzero_ps(), offset8, (__m256bh)low),
                                                       offset8, (__m256bh)high));
            }
        }
    *offsets = sums;
    return xs;
}

/* Rows n0..n1-1 of y = x @ W^T (+ b) with 4-bit W (decode_block.h's 4-bit section), two blocks of 32 per step. A
   nibble q becomes the bf16 of 128 + q with one OR (0x4300 | q: bf16 steps by 1 between 128 and 256): the 32 bytes
   of two blocks are zero-extended to 16-bit lanes, their low nibbles masked and OR-ed (one VPTERNLOG), their high
   ones shifted and OR-ed; two VDPBF16PS against x's bf16 (in q4_rows' order) sum the exact products (128 + q) * x in
   fp32, lanes 0-7 for one block and 8-15 for the other; less q4_rows' 136 * x sums that is (q - 8) * x (the two
   sums ~17x larger than their difference: a few more fp32 roundings than the PyTorch path's, still far below the
   result's one rounding to bf16), and one FMA adds it times each block's scale. About ten instructions per 64
   weights (a table lookup per nibble, or nibbles widened to fp32 for FMAs, took more: benchmarks/README.md). */
BF16_KERNEL static inline __attribute__((always_inline)) void
rows_q4(const bf16 *x, const uint8_t *W, const uint16_t *scale, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K,
        int64_t n0, int64_t n1) {
    const int64_t blocks = K / Q4_BLOCK;
    const float *offsets;
    const bf16 *xs = q4_rows(x, M, K, &offsets);
    if (!xs) {
        rows_q4_unbuffered(x, W, scale, b, y, M, N, K, n0, n1);
        return;
    }
    const __m512i low_nibble = _mm512_set1_epi16(0x0f), bf16_128 = _mm512_set1_epi16(0x4300);
    const __m512i pair_lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = W + n * (K / 2);
        const uint16_t *d = scale + n * blocks;
        __m512 acc[MAX_ROWS];
        for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 2 <= blocks; i += 2) {
            if ((i & 3) == 0) _mm_prefetch((const char *)(w + 16 * i) + Q4_PREFETCH_BYTES, _MM_HINT_T0);
            const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(w + 16 * i)));
            const __m512bh low = (__m512bh)_mm512_ternarylogic_epi32(bytes, low_nibble, bf16_128, 0xea);
            const __m512bh high = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes, 4), bf16_128);
            uint32_t two;  /* the two blocks' fp16 scales */
            memcpy(&two, d + i, sizeof two);
            const __m512 block_scales = _mm512_permutexvar_ps(
                pair_lanes, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)two))));
            for (int m = 0; m < M; m++) {
                const bf16 *xb = xs + m * K + Q4_BLOCK * i;
                __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), low, (__m512bh)_mm512_loadu_si512(xb));
                sum = _mm512_dpbf16_ps(sum, high, (__m512bh)_mm512_loadu_si512(xb + 32));
                sum = _mm512_sub_ps(sum, _mm512_loadu_ps(offsets + (m * blocks + i) * 8));
                acc[m] = _mm512_fmadd_ps(sum, block_scales, acc[m]);
            }
        }
        __m256 last[MAX_ROWS];  /* an odd last block */
        for (int m = 0; m < M; m++) last[m] = _mm256_setzero_ps();
        if (i < blocks) {
            const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * i)));
            const __m256bh low = (__m256bh)_mm256_ternarylogic_epi32(bytes, _mm512_castsi512_si256(low_nibble),
                                                                     _mm512_castsi512_si256(bf16_128), 0xea);
            const __m256bh high = (__m256bh)_mm256_or_si256(_mm256_srli_epi16(bytes, 4),
                                                             _mm512_castsi512_si256(bf16_128));
            const __m256 block_scale = _mm256_set1_ps(_cvtsh_ss(d[i]));
            for (int m = 0; m < M; m++) {
                const bf16 *xb = xs + m * K + Q4_BLOCK * i;
                __m256 sum = _mm256_dpbf16_ps(_mm256_setzero_ps(), low,
                                              (__m256bh)_mm256_loadu_si256((const __m256i *)xb));
                sum = _mm256_dpbf16_ps(sum, high, (__m256bh)_mm256_loadu_si256((const __m256i *)(xb + 16)));
                sum = _mm256_sub_ps(sum, _mm256_loadu_ps(offsets + (m * blocks + i) * 8));
                last[m] = _mm256_mul_ps(sum, block_scale);
            }
        }
        for (int m = 0; m < M; m++)
            y[m * N + n] = finish_q4(_mm512_reduce_add_ps(_mm512_add_ps(acc[m], _mm512_zextps256_ps512(last[m]))),
                                     b, n);
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
