/* bf16 decode steps on a CPU with AVX2 and FMA (Intel since Haswell, AMD since Zen 1): the same two entry points
   as decode_bf16.c, for the CPUs without AVX512-BF16 that most laptops and many cloud VMs have.

   1. palmchat_linear_bf16: y = x @ W^T (+ b) for a few rows, each thread streaming its band of rows of W in memory
      order (decode_bf16.c says why). The weights stay bf16 in memory, half the bytes per token of fp32, and are
      widened to fp32 in registers: a bf16 is the upper half of the fp32 with the same value, so widening is a
      shift or a mask, and the products and their sums are fp32 FMAs.
   2. palmchat_block_bf16: one decode step through one transformer block, attention over the bf16 KV cache
      included (decode_block.h, the same code as decode_bf16.c's).
   3. palmchat_linear_q8 and palmchat_linear_q4: the gemv with int8 weights and a scale per row, or 4-bit weights
      and a scale per block of 32 (decode_block.h); blocks take them too.

   Numerics: those of decode_bf16.c (the PyTorch bf16 path op by op, fp32 accumulation of bf16 products); an FMA
   rounds each product-and-add once, as VDPBF16PS's fp32 accumulation does, so only the order of fp32 additions
   differs. Loaded by palmchat/kernels/cpu_linear.py where the CPU has AVX2 and FMA but not AVX512-BF16 (or under
   PALMCHAT_MAX_CPU_ISA=avx2); built by setup.py (optional). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AVX2_KERNEL __attribute__((target("avx2,fma,f16c")))
#define KERNEL AVX2_KERNEL

#include "decode_block.h"

int palmchat_linear_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* 16 bf16 -> their even and odd elements as 8 fp32 each. Seen as eight 32-bit lanes, element 2i is the lane's low
   half (shifted up, it is the fp32 of the same value) and element 2i+1 its high half (masked, likewise). Two
   integer ops and no lane-crossing shuffle; both operands of a product are split alike, so the pairs still meet. */
AVX2_KERNEL static inline void widen(const bf16 *p, __m256 *even, __m256 *odd) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32((int)0xffff0000u)));
}

AVX2_KERNEL static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ------------------------------------------------------------------------------------------------------------
   The gemv
   ------------------------------------------------------------------------------------------------------------ */

/* Rows n0..n1-1 of y (M, N) = x (M, K) @ W (N, K)^T + b (N,) (b may be NULL), W bf16. Inlined with M a constant,
   so the accumulators stay in registers: two per input row and 16-element chunk (even and odd elements), and two
   chunks per step when there are 1 or 2 rows, so that at least four FMA chains are in flight (an FMA waits ~4
   cycles for the one before it in its chain). The last K % 16 elements go through zero-padded copies. */
AVX2_KERNEL static inline __attribute__((always_inline)) void
rows(const bf16 *x, const bf16 *W, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int chunks = M <= 2 ? 2 : 1;
    const int64_t step = 16 * chunks, stepped = K / step * step, full = K / 16 * 16, left = K - full;
    bf16 x_tail[MAX_ROWS][16], w_tail[16];
    memset(x_tail, 0, sizeof x_tail);
    memset(w_tail, 0, sizeof w_tail);
    for (int m = 0; m < M; m++) memcpy(x_tail[m], x + m * K + full, sizeof(bf16) * left);
    for (int64_t n = n0; n < n1; n++) {
        const bf16 *w = W + n * K;
        __m256 acc[MAX_ROWS][4], w_even, w_odd, x_even, x_odd;
        for (int m = 0; m < M; m++)
            for (int a = 0; a < 4; a++) acc[m][a] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k < stepped; k += step)
            for (int c = 0; c < chunks; c++) {
                widen(w + k + 16 * c, &w_even, &w_odd);
                for (int m = 0; m < M; m++) {
                    widen(x + m * K + k + 16 * c, &x_even, &x_odd);
                    acc[m][2 * c] = _mm256_fmadd_ps(w_even, x_even, acc[m][2 * c]);
                    acc[m][2 * c + 1] = _mm256_fmadd_ps(w_odd, x_odd, acc[m][2 * c + 1]);
                }
            }
        for (; k < full; k += 16) {  /* a last whole chunk after the steps */
            widen(w + k, &w_even, &w_odd);
            for (int m = 0; m < M; m++) {
                widen(x + m * K + k, &x_even, &x_odd);
                acc[m][0] = _mm256_fmadd_ps(w_even, x_even, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w_odd, x_odd, acc[m][1]);
            }
        }
        if (left) {
            memcpy(w_tail, w + full, sizeof(bf16) * left);
            widen(w_tail, &w_even, &w_odd);
            for (int m = 0; m < M; m++) {
                widen(x_tail[m], &x_even, &x_odd);
                acc[m][0] = _mm256_fmadd_ps(w_even, x_even, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w_odd, x_odd, acc[m][1]);
            }
        }
        for (int m = 0; m < M; m++) {
            __m256 sum = _mm256_add_ps(acc[m][0], acc[m][1]);
            if (chunks == 2) sum = _mm256_add_ps(sum, _mm256_add_ps(acc[m][2], acc[m][3]));
            y[m * N + n] = to_bf16(sum8(sum) + (b ? to_f32(b[n]) : 0.0f));
        }
    }
}

/* Rows n0..n1-1 of y = x @ (W * scale)^T (+ b) with int8 W (decode_block.h's int8 section), as decode_bf16.c's
   rows_q8: x widened to fp32 once per call (widened_rows), each 8 int8 sign-extended to 32 bits and converted to
   fp32 (exact), fp32 FMAs summing the exact products, four chains per row; three instructions per 8 weights
   (widening both operands per weight, as the bf16 path does, kept an Intel core below its share of memory
   bandwidth). The last K % 8 elements one at a time. */
AVX2_KERNEL static inline __attribute__((always_inline)) void
rows_q8(const bf16 *x, const int8_t *W, const bf16 *scale, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K,
        int64_t n0, int64_t n1) {
    const float *xf = widened_rows(x, M, K);
    if (!xf) {
        rows_q8_unbuffered(x, W, scale, b, y, M, N, K, n0, n1);
        return;
    }
    const int64_t full = K / 8 * 8;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *w = W + n * K;
        __m256 acc[MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int a = 0; a < 4; a++) acc[m][a] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            if ((k & 63) == 0) _mm_prefetch((const char *)(w + k) + Q8_PREFETCH_BYTES, _MM_HINT_T0);
            for (int c = 0; c < 4; c++) {
                const __m256 w8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                    _mm_loadl_epi64((const __m128i *)(w + k + 8 * c))));
                for (int m = 0; m < M; m++)
                    acc[m][c] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(xf + m * K + k + 8 * c), acc[m][c]);
            }
        }
        for (; k < full; k += 8) {
            const __m256 w8 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
            for (int m = 0; m < M; m++)
                acc[m][0] = _mm256_fmadd_ps(w8, _mm256_loadu_ps(xf + m * K + k), acc[m][0]);
        }
        for (int m = 0; m < M; m++) {
            float sum = sum8(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
            for (int64_t j = full; j < K; j++) sum = fmaf((float)w[j], xf[m * K + j], sum);
            y[m * N + n] = finish_q8(sum, scale, b, n);
        }
    }
}

/* Rows n0..n1-1 of y = x @ W^T (+ b) with 4-bit W (decode_block.h's 4-bit section). x is widened to fp32 once per
   call (widened_rows). Per block of 32: the low and the high nibbles of its 16 bytes, masked and shifted out, less 8
   as bytes (q - 8, exact), 8 at a time sign-extended to 32 bits and converted to fp32; fp32 FMAs sum the exact
   products with x, and one more adds the block's sum times its scale. */
AVX2_KERNEL static inline __attribute__((always_inline)) void
rows_q4(const bf16 *x, const uint8_t *W, const uint16_t *scale, const bf16 *b, bf16 *y, int M, int64_t N, int64_t K,
        int64_t n0, int64_t n1) {
    const int64_t blocks = K / Q4_BLOCK;
    const float *xf = widened_rows(x, M, K);
    if (!xf) {
        rows_q4_unbuffered(x, W, scale, b, y, M, N, K, n0, n1);
        return;
    }
    const __m128i low_nibble = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = W + n * (K / 2);
        __m256 acc[MAX_ROWS][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        for (int64_t i = 0; i < blocks; i++) {
            if ((i & 3) == 0) _mm_prefetch((const char *)(w + 16 * i) + Q4_PREFETCH_BYTES, _MM_HINT_T0);
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(w + 16 * i));
            const __m128i low = _mm_sub_epi8(_mm_and_si128(bytes, low_nibble), eight);
            const __m128i high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibble), eight);
            const __m256 q[4] = {  /* elements 0-7, 8-15 (low nibbles), 16-23, 24-31 (high nibbles) as q - 8 */
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8))),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)))};
            const __m256 block_scale = _mm256_set1_ps(_cvtsh_ss(scale[n * blocks + i]));
            for (int m = 0; m < M; m++) {
                const float *xb = xf + m * K + Q4_BLOCK * i;
                __m256 sum = _mm256_setzero_ps();
                for (int g = 0; g < 4; g++) sum = _mm256_fmadd_ps(q[g], _mm256_loadu_ps(xb + 8 * g), sum);
                acc[m][i & 1] = _mm256_fmadd_ps(sum, block_scale, acc[m][i & 1]);
            }
        }
        for (int m = 0; m < M; m++) y[m * N + n] = finish_q4(sum8(_mm256_add_ps(acc[m][0], acc[m][1])), b, n);
    }
}

/* ------------------------------------------------------------------------------------------------------------
   Attention's two products (decode_block.h's attend): scores q . k, and the probability-weighted sum of V
   ------------------------------------------------------------------------------------------------------------ */

/* sum of a[i] * b[i] over D bf16 pairs, in fp32 */
AVX2_KERNEL static inline float dot_bf16(const bf16 *a, const bf16 *b, int64_t D) {
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps(), a_even, a_odd, b_even, b_odd;
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        widen(a + d, &a_even, &a_odd);
        widen(b + d, &b_even, &b_odd);
        even = _mm256_fmadd_ps(a_even, b_even, even);
        odd = _mm256_fmadd_ps(a_odd, b_odd, odd);
    }
    float sum = sum8(_mm256_add_ps(even, odd));
    for (; d < D; d++) sum = fmaf(to_f32(a[d]), to_f32(b[d]), sum);
    return sum;
}

/* acc[d] += weight * v[d] for D bf16 values, fp32 accumulators. Here the elements keep their order (acc is
   indexed by d), so each 8 bf16 are zero-extended to 32 bits and shifted up. */
AVX2_KERNEL static inline void axpy_bf16(float *acc, float weight, const bf16 *v, int64_t D) {
    const __m256 w = _mm256_set1_ps(weight);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        __m256 values = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(v + d))), 16));
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(w, values, _mm256_loadu_ps(acc + d)));
    }
    for (; d < D; d++) acc[d] = fmaf(weight, to_f32(v[d]), acc[d]);
}
