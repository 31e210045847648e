/* y = x @ W^T for a few rows of bf16 activations: the linear layers of a decode step on a CPU with AVX512-BF16.

   A decode step reads every weight once per token, so its linears are bound by memory bandwidth. oneDNN's packed
   kernel reads its blocked layout as several short interleaved streams, which the hardware prefetchers follow
   poorly: ~17 GB/s from DRAM on a 2-core AMD EPYC (Zen 4) where a plain streaming read gets ~35 GB/s. Here each
   thread walks its rows of W from start to end in memory order, one stream, and reaches ~30 GB/s there
   (benchmarks/README.md). Used by palmchat/inference/cpu_linear.py; built by setup.py (optional: without it,
   oneDNN serves every linear).

   Numerics: products of bf16 pairs accumulated in fp32 (VDPBF16PS), the sum rounded once to bf16, as oneDNN does;
   only the order of the fp32 additions differs. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define MAX_ROWS 4
#define BF16_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

int palmchat_linear_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* Rows n0..n1-1 of y (M, N) = x (M, K) @ W (N, K)^T. Inlined with M a constant, so the accumulators stay in
   registers: two per input row, so that consecutive VDPBF16PS do not wait on each other. */
BF16_KERNEL static inline __attribute__((always_inline)) void
rows(const uint16_t *x, const uint16_t *W, uint16_t *y, int M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
    const int64_t full = K / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (K - full)) - 1);
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *w = W + n * K;
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
        for (int m = 0; m < M; m++) {
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
            __m128bh rounded = _mm_cvtneps_pbh(_mm_set_ss(sum));  /* round to nearest even */
            y[m * N + n] = (uint16_t)_mm_extract_epi16((__m128i)rounded, 0);
        }
    }
}

/* y (M, N) = x (M, K) @ W (N, K)^T, all bf16 and contiguous, 1 <= M <= MAX_ROWS. The OpenMP threads (the same
   runtime and thread count as PyTorch's) each take one contiguous band of rows of W. */
BF16_KERNEL void palmchat_linear_bf16(const uint16_t *x, const uint16_t *W, uint16_t *y, int M, int64_t N, int64_t K) {
    #pragma omp parallel
    {
        const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
        const int64_t n0 = N * t / threads, n1 = N * (t + 1) / threads;
        switch (M) {
            case 1: rows(x, W, y, 1, N, K, n0, n1); break;
            case 2: rows(x, W, y, 2, N, K, n0, n1); break;
            case 3: rows(x, W, y, 3, N, K, n0, n1); break;
            default: rows(x, W, y, 4, N, K, n0, n1); break;
        }
    }
}
