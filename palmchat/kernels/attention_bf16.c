/* Causal attention, forward and backward, for bf16 training on a CPU: AMX tiles where the CPU has them
   (Intel since Sapphire Rapids), AVX512-BF16 otherwise.

   FlashAttention-2, Dao 2023, https://arxiv.org/abs/2307.08691: the forward keeps only each query row's
   log-sum-exp, and the backward (Algorithm 2) recomputes the scores one (query block, key block) tile at a time,
   so memory stays O(T x D) per thread, never (T, T). PyTorch's CPU flash kernel takes ~6.5 ms forward and ~37 ms
   backward per layer at batch 8 x 512 tokens, 8 query heads x 64 on one K/V head; its backward tiles are many
   small oneDNN calls. Here a tile's products run on AMX tiles straight from L1/L2: ~3.5 ms and ~8.5 ms.

   One unit of work is one (batch row, K/V head): the G query heads that share the K/V head loop inside it, so K
   and V are packed once and their gradients are summed over the G heads without a reduction pass. Units run in
   parallel (OpenMP). Numerics: scores, softmax and every sum in fp32; the probabilities P and the score gradients
   dS are rounded to bf16 for the products, as in PyTorch's CPU kernel and FlashAttention on GPUs.

   Shapes: B batch, H query heads, Hkv K/V heads, G = H / Hkv, T tokens (padded to TP, a multiple of BLOCK),
   D head dim (a multiple of 16; of 32 for AMX). Used by palmchat/kernels/cpu_attention.py; built by setup.py
   (optional). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK 32  /* query rows and keys per tile */
#define ROWS 4    /* rows of the output a micro-kernel call keeps in registers */
#define BF16_KERNEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define AMX_KERNEL __attribute__((target("amx-tile,amx-bf16,avx512f")))

typedef uint16_t bf16;

int palmchat_attention_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* AMX tiles need the kernel's permission once per process (Linux >= 5.16); PyTorch's oneDNN asks for it too. */
int palmchat_attention_amx_supported(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

static inline bf16 to_bf16(float f) {  /* round to nearest even, as c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* ------------------------------------------------------------------------------------------------------------
   C (M, N) fp32 (+)= A (M, K) bf16 row-major  @  B given as pairs: Bp[k/2][n][2] = (B[k][n], B[k+1][n])
   VDPBF16PS multiplies one pair of A's row by the same pair of 16 columns of B and adds both products into 16 fp32
   lanes, so B is packed with consecutive k side by side ("VNNI" layout) and A's pair is broadcast. N is a multiple
   of 16, K is even.
   ------------------------------------------------------------------------------------------------------------ */

BF16_KERNEL static inline __attribute__((always_inline)) void
dpbf16_kernel(int rows, int nz, int64_t K, const bf16 *A, int64_t lda, const bf16 *Bp, int64_t ldb,
            float *C, int64_t ldc, int accumulate) {
    __m512 acc[ROWS][4];
    for (int r = 0; r < rows; r++)
        for (int z = 0; z < nz; z++)
            acc[r][z] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * z) : _mm512_setzero_ps();
    for (int64_t p = 0; p < K / 2; p++) {
        __m512i b[4];
        for (int z = 0; z < nz; z++) b[z] = _mm512_loadu_si512(Bp + p * 2 * ldb + 32 * z);
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, A + r * lda + 2 * p, sizeof pair);
            __m512i a = _mm512_set1_epi32(pair);
            for (int z = 0; z < nz; z++) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], (__m512bh)a, (__m512bh)b[z]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int z = 0; z < nz; z++) _mm512_storeu_ps(C + r * ldc + 16 * z, acc[r][z]);
}

/* ldb counts pairs per packed row: Bp[p][n] is at Bp + (p * ldb + n) * 2. */
BF16_KERNEL static void gemm(int64_t M, int64_t N, int64_t K, const bf16 *A, int64_t lda, const bf16 *Bp,
                             int64_t ldb, float *C, int64_t ldc, int accumulate) {
    for (int64_t n = 0; n < N; n += 64) {
        int nz = (int)((N - n) / 16 < 4 ? (N - n) / 16 : 4);
        int64_t m = 0;
        for (; m + ROWS <= M; m += ROWS) {  /* constant row and column counts: the accumulators stay in registers */
            const bf16 *a = A + m * lda, *b = Bp + 2 * n;
            float *c = C + m * ldc + n;
            if (nz == 4) dpbf16_kernel(ROWS, 4, K, a, lda, b, ldb, c, ldc, accumulate);
            else if (nz == 2) dpbf16_kernel(ROWS, 2, K, a, lda, b, ldb, c, ldc, accumulate);
            else
                for (int z = 0; z < nz; z++)
                    dpbf16_kernel(ROWS, 1, K, a, lda, b + 32 * z, ldb, c + 16 * z, ldc, accumulate);
        }
        for (; m < M; m++)  /* the last rows, one at a time */
            for (int z = 0; z < nz; z++)
                dpbf16_kernel(1, 1, K, A + m * lda, lda, Bp + 2 * (n + 16 * z), ldb, C + m * ldc + n + 16 * z, ldc,
                              accumulate);
    }
}

/* The same product on AMX tiles (Intel since Sapphire Rapids): one TDPBF16PS multiplies a 16 x 32 tile of A by a
   32 x 16 tile of B (the same pairs layout) into a 16 x 16 fp32 tile of C. Each step here computes a 32 x 32 block
   of C in tiles 0-3 from two tiles of A (4, 5) and two of B (6, 7). M, N and K are multiples of 32. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles 0-7: 16 rows of 64 bytes. A constant in memory: GCC 12 drops stores to a local config before LDTILECFG. */
static const TileConfig TILES = {.palette = 1, .bytes_per_row = {64, 64, 64, 64, 64, 64, 64, 64},
                                 .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

AMX_KERNEL static void amx_configure(void) { _tile_loadconfig(&TILES); }

AMX_KERNEL static void amx_release(void) { _tile_release(); }

AMX_KERNEL static void amx_gemm(int64_t M, int64_t N, int64_t K, const bf16 *A, int64_t lda, const bf16 *Bp,
                                int64_t ldb, float *C, int64_t ldc, int accumulate) {
    for (int64_t m = 0; m < M; m += 32)
        for (int64_t n = 0; n < N; n += 32) {
            float *c = C + m * ldc + n;
            if (accumulate) {
                _tile_loadd(0, c, ldc * 4);
                _tile_loadd(1, c + 16, ldc * 4);
                _tile_loadd(2, c + 16 * ldc, ldc * 4);
                _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
            } else {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
            }
            for (int64_t k = 0; k < K; k += 32) {
                _tile_loadd(4, A + m * lda + k, lda * 2);
                _tile_loadd(5, A + (m + 16) * lda + k, lda * 2);
                _tile_loadd(6, Bp + (k / 2 * ldb + n) * 2, ldb * 4);
                _tile_loadd(7, Bp + (k / 2 * ldb + n + 16) * 2, ldb * 4);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, ldc * 4);
            _tile_stored(1, c + 16, ldc * 4);
            _tile_stored(2, c + 16 * ldc, ldc * 4);
            _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
        }
}

/* X (T, D) with row stride ld -> pairs over D: out[d/2][t][2] = (X[t][d], X[t][d+1]), t < width, zero beyond T. */
static void pack_pairs_over_d(const bf16 *X, int64_t ld, int64_t T, int64_t width, int64_t D, bf16 *out) {
    memset(out, 0, sizeof(bf16) * width * D);
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < D; d += 2) memcpy(out + ((d / 2) * width + t) * 2, X + t * ld + d, 2 * sizeof(bf16));
}

/* X (T, D) -> pairs over T: out[t/2][d][2] = (X[t][d], X[t+1][d]), t padded to TP with zeros. */
static void pack_pairs_over_t(const bf16 *X, int64_t ld, int64_t T, int64_t TP, int64_t D, bf16 *out) {
    memset(out, 0, sizeof(bf16) * TP * D);
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < D; d++) out[((t / 2) * D + d) * 2 + (t & 1)] = X[t * ld + d];
}

/* X (T, D) with row stride ld -> a contiguous (TP, D) copy, padded with zero rows. */
static void copy_rows(const bf16 *X, int64_t ld, int64_t T, int64_t TP, int64_t D, bf16 *out) {
    memset(out + T * D, 0, sizeof(bf16) * (TP - T) * D);
    for (int64_t t = 0; t < T; t++) memcpy(out + t * D, X + t * ld, sizeof(bf16) * D);
}

/* X (T, D) -> X^T (D, width), zero beyond T: row d holds pairs over T, an A operand of gemm. In blocks of 32
   rows, so that the writes go along a row of X^T. */
static void transpose(const bf16 *X, int64_t ld, int64_t T, int64_t width, int64_t D, bf16 *out) {
    memset(out, 0, sizeof(bf16) * width * D);
    for (int64_t t0 = 0; t0 < T; t0 += 32) {
        int64_t t1 = t0 + 32 < T ? t0 + 32 : T;
        for (int64_t d = 0; d < D; d++)
            for (int64_t t = t0; t < t1; t++) out[d * width + t] = X[t * ld + d];
    }
}

BF16_KERNEL static inline __m512 load_bf16(const bf16 *x) {  /* 16 bf16 -> 16 fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

BF16_KERNEL static inline void store_bf16(bf16 *out, __m512 x) {
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(x));
}

/* exp for 16 lanes: 2^n * e^r with |r| <= ln2 / 2 and a degree-6 Taylor polynomial (relative error ~2e-7, far
   below the bf16 rounding that follows). */
BF16_KERNEL static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* Rows r and r+1 of an fp32 tile (BLOCK columns) -> pairs over rows, bf16: out[c][2] = (X[r][c], X[r+1][c]). */
BF16_KERNEL static inline void pack_two_rows(const float *row, const float *next_row, bf16 *out) {
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int half = 0; half < BLOCK / 16; half++) {
        __m256i a = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + 16 * half));
        __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(next_row + 16 * half));
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
        _mm512_storeu_si512(out + 32 * half, _mm512_permutexvar_epi16(interleave, both));
    }
}

typedef struct {
    int64_t batch, n_heads, n_kv_heads, seq, head_dim;
    float scale;
    const bf16 *q, *k, *v, *out, *grad_out;  /* (B, H or Hkv, T, D), D contiguous; strides below */
    int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3], grad_out_strides[3];  /* batch, head, token */
    const float *lse;                        /* (B, H, T): log-sum-exp of each row's scaled scores */
    int64_t lse_strides[3];
    int64_t use_amx;                         /* AMX tiles for the products: needs D % 32 == 0 */
    bf16 *grad_q, *grad_k, *grad_v;          /* (B, H or Hkv, T, D) contiguous */
} Backward;

/* Each thread's scratch memory, kept between calls, since fresh pages from the kernel are slow to fault in
   (measured: the backward at batch 8 x 512 tokens 9.8 -> 8.5 ms). OpenMP's threads persist, and so does this:
   ~5 MB per thread at that shape, held until the thread exits. */
static __thread char *scratch;
static __thread size_t scratch_size;

/* Points parts[i] at sizes[i] bytes of this thread's scratch, each 64-byte aligned. Returns 0 when out of memory. */
static int reserve(const size_t *sizes, int count, char **parts) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += (sizes[i] + 63) / 64 * 64;
    if (total > scratch_size) {
        free(scratch);
        scratch = aligned_alloc(64, total);
        scratch_size = scratch ? total : 0;
        if (!scratch) return 0;
    }
    for (size_t i = 0, offset = 0; i < (size_t)count; offset += (sizes[i] + 63) / 64 * 64, i++)
        parts[i] = scratch + offset;
    return 1;
}

#define AT(x, s, b, h, t) ((x) + (b) * (s)[0] + (h) * (s)[1] + (t) * (s)[2])

/* One (batch row b, K/V head kh). Returns 1 when out of memory. */
BF16_KERNEL static int backward_unit(const Backward *a, int64_t b, int64_t kh) {
    const int64_t T = a->seq, D = a->head_dim, G = a->n_heads / a->n_kv_heads;
    const int64_t TP = (T + BLOCK - 1) / BLOCK * BLOCK;
    /* the row length of buffers read along T in tiles of 16 rows: not a power of two, since rows a multiple of
       1 KB apart fall in the same few L1 sets */
    const int64_t LD = TP + 32;
    const float scale = a->scale;
    const size_t packed = sizeof(bf16) * TP * D, wide = sizeof(bf16) * LD * D;
    /* K and V packed for the tile products; Q^T, dO^T and Q, dO with padded rows for each query head; P and dS of
       one key block against every query row after it; fp32 gradient accumulators (dK^T and dV^T transposed,
       (D, LD), because they are produced as dO^T P and Q^T dS) */
    const size_t sizes[] = {wide, wide, packed, wide * G, wide * G, packed * G, packed * G,
                            sizeof(bf16) * TP * BLOCK, sizeof(bf16) * TP * BLOCK, sizeof(bf16) * TP * BLOCK,
                            sizeof(float) * G * TP * D, sizeof(float) * LD * D, sizeof(float) * LD * D,
                            sizeof(float) * G * TP};
    char *parts[14];
    if (!reserve(sizes, 14, parts)) return 1;
    bf16 *k_over_d = (bf16 *)parts[0], *v_over_d = (bf16 *)parts[1], *k_over_t = (bf16 *)parts[2];
    bf16 *q_t = (bf16 *)parts[3], *grad_out_t = (bf16 *)parts[4], *q_rows = (bf16 *)parts[5];
    bf16 *grad_out_rows = (bf16 *)parts[6], *p_pairs = (bf16 *)parts[7], *grad_s_pairs = (bf16 *)parts[8];
    bf16 *grad_s_rows = (bf16 *)parts[9];
    float *grad_q = (float *)parts[10], *grad_k_t = (float *)parts[11], *grad_v_t = (float *)parts[12];
    float *delta = (float *)parts[13];
    memset(grad_q, 0, sizes[10]);
    memset(grad_k_t, 0, sizes[11]);
    memset(grad_v_t, 0, sizes[12]);
    void (*product)(int64_t, int64_t, int64_t, const bf16 *, int64_t, const bf16 *, int64_t, float *, int64_t, int)
        = a->use_amx ? amx_gemm : gemm;
    if (a->use_amx) amx_configure();
    pack_pairs_over_d(AT(a->k, a->k_strides, b, kh, 0), a->k_strides[2], T, LD, D, k_over_d);
    pack_pairs_over_d(AT(a->v, a->v_strides, b, kh, 0), a->v_strides[2], T, LD, D, v_over_d);
    pack_pairs_over_t(AT(a->k, a->k_strides, b, kh, 0), a->k_strides[2], T, TP, D, k_over_t);
    for (int64_t g = 0; g < G; g++) {
        int64_t h = kh * G + g;
        transpose(AT(a->q, a->q_strides, b, h, 0), a->q_strides[2], T, LD, D, q_t + g * LD * D);
        copy_rows(AT(a->q, a->q_strides, b, h, 0), a->q_strides[2], T, TP, D, q_rows + g * TP * D);
        copy_rows(AT(a->grad_out, a->grad_out_strides, b, h, 0), a->grad_out_strides[2], T, TP, D,
                  grad_out_rows + g * TP * D);
        transpose(AT(a->grad_out, a->grad_out_strides, b, h, 0), a->grad_out_strides[2], T, LD, D,
                  grad_out_t + g * LD * D);
        for (int64_t t = 0; t < T; t++) {  /* delta = rowsum(dO * O) (FlashAttention-2, Algorithm 2 line 4) */
            const bf16 *o = AT(a->out, a->out_strides, b, h, t);
            const bf16 *dout = AT(a->grad_out, a->grad_out_strides, b, h, t);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) sum = _mm512_fmadd_ps(load_bf16(o + d), load_bf16(dout + d), sum);
            delta[g * TP + t] = _mm512_reduce_add_ps(sum);
        }
    }
    float scores[BLOCK * BLOCK], grad_p[BLOCK * BLOCK], p[BLOCK * BLOCK], grad_s[BLOCK * BLOCK];
    for (int64_t c0 = 0; c0 < T; c0 += BLOCK) {           /* key block: keys c0..c0+BLOCK-1 */
        const int64_t n = TP - c0;                        /* causal: the query rows from the key block on */
        for (int64_t g = 0; g < G; g++) {
            const int64_t h = kh * G + g;
            const float *lse = AT(a->lse, a->lse_strides, b, h, 0);
            const int64_t lse_stride = a->lse_strides[2];
            for (int64_t r0 = c0; r0 < T; r0 += BLOCK) {
                const int64_t rows = T - r0 < BLOCK ? T - r0 : BLOCK;
                /* S = Q K^T and dP = dO V^T, (BLOCK rows, BLOCK keys) */
                product(BLOCK, BLOCK, D, q_rows + (g * TP + r0) * D, D, k_over_d + 2 * c0, LD, scores, BLOCK, 0);
                product(BLOCK, BLOCK, D, grad_out_rows + (g * TP + r0) * D, D, v_over_d + 2 * c0, LD, grad_p,
                        BLOCK, 0);
                /* P = exp(scale S - lse) where the key is visible, dS = P (dP - delta) */
                for (int64_t r = 0; r < BLOCK; r++) {
                    int64_t visible = r < rows ? r0 + r - c0 + 1 : 0;  /* keys c0..r0+r */
                    if (visible > T - c0) visible = T - c0;
                    __m512 row_lse = _mm512_set1_ps(r < rows ? lse[(r0 + r) * lse_stride] : 0.f);
                    __m512 row_delta = _mm512_set1_ps(r < rows ? delta[g * TP + r0 + r] : 0.f);
                    for (int half = 0; half < BLOCK / 16; half++) {
                        int64_t lanes = visible - 16 * half;
                        __mmask16 mask = lanes >= 16 ? 0xffff : lanes <= 0 ? 0 : (__mmask16)((1u << lanes) - 1);
                        int64_t i = r * BLOCK + 16 * half;
                        __m512 s = _mm512_fmsub_ps(_mm512_loadu_ps(scores + i), _mm512_set1_ps(scale), row_lse);
                        __m512 pv = _mm512_maskz_mov_ps(mask, exp16(s));
                        __m512 ds = _mm512_maskz_mul_ps(mask, pv,
                                                        _mm512_sub_ps(_mm512_loadu_ps(grad_p + i), row_delta));
                        _mm512_storeu_ps(p + i, pv);
                        _mm512_storeu_ps(grad_s + i, ds);
                        _mm256_storeu_si256((__m256i *)(grad_s_rows + (r0 - c0) * BLOCK + i),
                                            (__m256i)_mm512_cvtneps_pbh(ds));
                    }
                }
                for (int64_t r = 0; r < BLOCK; r += 2) {
                    pack_two_rows(p + r * BLOCK, p + (r + 1) * BLOCK, p_pairs + (r0 - c0 + r) * BLOCK);
                    pack_two_rows(grad_s + r * BLOCK, grad_s + (r + 1) * BLOCK,
                                  grad_s_pairs + (r0 - c0 + r) * BLOCK);
                }
            }
            /* over all n query rows at once: dV^T += dO^T P and dK^T += Q^T dS, (D, BLOCK keys); dQ += dS K */
            product(D, BLOCK, n, grad_out_t + g * LD * D + c0, LD, p_pairs, BLOCK, grad_v_t + c0, LD, 1);
            product(D, BLOCK, n, q_t + g * LD * D + c0, LD, grad_s_pairs, BLOCK, grad_k_t + c0, LD, 1);
            product(n, D, BLOCK, grad_s_rows, BLOCK, k_over_t + c0 * D, D, grad_q + (g * TP + c0) * D, D, 1);
        }
    }
    bf16 *out_k = a->grad_k + (b * a->n_kv_heads + kh) * T * D;
    bf16 *out_v = a->grad_v + (b * a->n_kv_heads + kh) * T * D;
    for (int64_t t0 = 0; t0 < T; t0 += 32)  /* dK^T and dV^T back to (T, D), in blocks as in transpose() */
        for (int64_t d = 0; d < D; d++)
            for (int64_t t = t0; t < t0 + 32 && t < T; t++) {
                out_k[t * D + d] = to_bf16(grad_k_t[d * LD + t] * scale);
                out_v[t * D + d] = to_bf16(grad_v_t[d * LD + t]);
            }
    for (int64_t g = 0; g < G; g++) {
        bf16 *out_q = a->grad_q + (b * a->n_heads + kh * G + g) * T * D;
        for (int64_t i = 0; i < T * D; i += 16)
            store_bf16(out_q + i, _mm512_mul_ps(_mm512_loadu_ps(grad_q + g * TP * D + i), _mm512_set1_ps(scale)));
    }
    if (a->use_amx) amx_release();
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------
   The forward: for each block of BLOCK query rows, the scores against every key up to the block's last row at
   once ((BLOCK, <= TP) fp32, so memory is O(T), never (T, T)), an exact softmax per row, then O = P V with P
   rounded to bf16 and the division by the row's sum after the product, as PyTorch's CPU flash kernel does.
   ------------------------------------------------------------------------------------------------------------ */

typedef struct {
    int64_t batch, n_heads, n_kv_heads, seq, head_dim;
    float scale;
    const bf16 *q, *k, *v;                   /* (B, H or Hkv, T, D), D contiguous; strides below */
    int64_t q_strides[3], k_strides[3], v_strides[3];  /* batch, head, token */
    int64_t use_amx;
    bf16 *out;                               /* (B, H, T, D) contiguous */
    float *lse;                              /* (B, H, T) contiguous: log-sum-exp of each row's scaled scores */
} Forward;

/* One (batch row b, K/V head kh). Returns 1 when out of memory. */
BF16_KERNEL static int forward_unit(const Forward *a, int64_t b, int64_t kh) {
    const int64_t T = a->seq, D = a->head_dim, G = a->n_heads / a->n_kv_heads;
    const int64_t TP = (T + BLOCK - 1) / BLOCK * BLOCK, LD = TP + 32;  /* LD: as in backward_unit */
    const float scale = a->scale;
    const size_t sizes[] = {sizeof(bf16) * LD * D, sizeof(bf16) * TP * D, sizeof(bf16) * TP * D,
                            sizeof(float) * BLOCK * LD, sizeof(bf16) * BLOCK * LD, sizeof(float) * BLOCK * D};
    char *parts[6];
    if (!reserve(sizes, 6, parts)) return 1;
    bf16 *k_over_d = (bf16 *)parts[0], *v_over_t = (bf16 *)parts[1], *q_rows = (bf16 *)parts[2];
    float *scores = (float *)parts[3], *out_rows = (float *)parts[5];
    bf16 *p_rows = (bf16 *)parts[4];
    void (*product)(int64_t, int64_t, int64_t, const bf16 *, int64_t, const bf16 *, int64_t, float *, int64_t, int)
        = a->use_amx ? amx_gemm : gemm;
    if (a->use_amx) amx_configure();
    pack_pairs_over_d(AT(a->k, a->k_strides, b, kh, 0), a->k_strides[2], T, LD, D, k_over_d);
    pack_pairs_over_t(AT(a->v, a->v_strides, b, kh, 0), a->v_strides[2], T, TP, D, v_over_t);
    for (int64_t g = 0; g < G; g++) {
        const int64_t h = kh * G + g;
        copy_rows(AT(a->q, a->q_strides, b, h, 0), a->q_strides[2], T, TP, D, q_rows);
        for (int64_t r0 = 0; r0 < T; r0 += BLOCK) {
            const int64_t keys = r0 + BLOCK, rows = T - r0 < BLOCK ? T - r0 : BLOCK;  /* causal: keys < r0 + BLOCK */
            product(BLOCK, keys, D, q_rows + r0 * D, D, k_over_d, LD, scores, LD, 0);
            float row_sum[BLOCK], row_max[BLOCK];
            for (int64_t r = 0; r < rows; r++) {
                const int64_t visible = r0 + r + 1;  /* keys 0..r0+r */
                const float *s = scores + r * LD;
                __m512 m = _mm512_set1_ps(-INFINITY);
                for (int64_t c = 0; c < visible; c += 16) {
                    __mmask16 mask = visible - c >= 16 ? 0xffff : (__mmask16)((1u << (visible - c)) - 1);
                    m = _mm512_mask_max_ps(m, mask, m, _mm512_loadu_ps(s + c));
                }
                const float max = _mm512_reduce_max_ps(m) * scale;
                __m512 sum = _mm512_setzero_ps();
                for (int64_t c = 0; c < keys; c += 16) {
                    int64_t lanes = visible - c;
                    __mmask16 mask = lanes >= 16 ? 0xffff : lanes <= 0 ? 0 : (__mmask16)((1u << lanes) - 1);
                    __m512 p = _mm512_maskz_mov_ps(mask, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s + c),
                                                                                _mm512_set1_ps(scale),
                                                                                _mm512_set1_ps(max))));
                    sum = _mm512_add_ps(sum, p);
                    store_bf16(p_rows + r * LD + c, p);
                }
                row_sum[r] = _mm512_reduce_add_ps(sum);
                row_max[r] = max;
            }
            for (int64_t r = rows; r < BLOCK; r++) memset(p_rows + r * LD, 0, sizeof(bf16) * keys);
            product(BLOCK, D, keys, p_rows, LD, v_over_t, D, out_rows, D, 0);  /* (P V) for the block */
            bf16 *out = a->out + ((b * a->n_heads + h) * T + r0) * D;
            float *lse = a->lse + (b * a->n_heads + h) * T + r0;
            for (int64_t r = 0; r < rows; r++) {
                __m512 inverse = _mm512_set1_ps(1.f / row_sum[r]);
                for (int64_t d = 0; d < D; d += 16)
                    store_bf16(out + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(out_rows + r * D + d), inverse));
                lse[r] = row_max[r] + logf(row_sum[r]);
            }
        }
    }
    if (a->use_amx) amx_release();
    return 0;
}

int palmchat_attention_forward_bf16(const Forward *a) {
    int failed = 0;
    const int64_t units = a->batch * a->n_kv_heads;
    #pragma omp parallel for schedule(dynamic) reduction(|: failed)
    for (int64_t u = 0; u < units; u++) failed |= forward_unit(a, u / a->n_kv_heads, u % a->n_kv_heads);
    return failed;
}

/* Returns 0, or 1 when out of memory. */
int palmchat_attention_backward_bf16(const Backward *a) {
    int failed = 0;
    const int64_t units = a->batch * a->n_kv_heads;
    #pragma omp parallel for schedule(dynamic) reduction(|: failed)
    for (int64_t u = 0; u < units; u++) failed |= backward_unit(a, u / a->n_kv_heads, u % a->n_kv_heads);
    return failed;
}
