/* Batch normalization on the CPU: the loops behind bnkit.kernels.cpu.
 *
 * Two memory layouts, each a plain contiguous array:
 *   ncl: (N, C, L), L contiguous (NCHW and any contiguous (N, C, *) with L = prod(*)).
 *   nc:  (M, C), C contiguous (2D inputs, and channels-last inputs with M = N * prod(*)).
 * Every function exists for float (suffix _f32), double (_f64), bfloat16 (_bf16) and
 * float16 (_f16) data, the 16-bit kinds computed in float. Statistics are taken relative to a
 * per-channel shift (a sample of the data), never as E[x^2] - E[x]^2 on raw values: ncl
 * float rows as shifted sums of d = x - s and d^2 in double (d is exact in double), ncl
 * double data as exact two-pass statistics of cache-sized blocks; nc rows, and the
 * reductions where double sums would make a loop arithmetic-bound, as sums in the compute
 * type over short blocks about a centre near the mean, flushed to double (Chan, Golub and
 * LeVeque's update for the statistics). One pass over memory. Outputs larger than the
 * last-level cache are written with streaming stores (see WRITE_ROW).
 * Work is split over threads by ranges of rows in memory order, or by channels (split
 * further into parts of the batch when channels are few), on `nt`
 * OpenMP threads (the process's libgomp: torch's own when torch is loaded first).
 * Compiled as C++ (it is also valid C) into one torch extension with fast.cpp by
 * bnkit.kernels.native; the functions have C names.
 */
#ifndef BN_TEMPLATE
#define BN_TEMPLATE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

/* C names, so that bnkit.kernels.native finds them with ctypes and fast.cpp by name. */
#ifdef __cplusplus
extern "C" {
#endif

typedef int64_t i64;

/* Elements per statistics block: small enough to be read twice from L1/L2. */
#define BLOCK 4096
/* Rows per block of the nc reductions summed in the element type before double. */
#define NC_SUM_ROWS 16
/* Values of an ncl row summed in float before double (short rows, 16-bit data). */
#define ROW_CHUNK 1024
/* Independent partial sums per reduction in the ncl loops (4 AVX-512 registers). */
#define LANES 32

static i64 min64(i64 a, i64 b) { return a < b ? a : b; }

/* How many parts to split each channel's rows into, so that C * parts covers the threads. */
static i64 parts_for(i64 C, i64 N, int nt) {
    if (nt <= 1 || C >= 4 * (i64)nt) return 1;
    i64 p = (4 * (i64)nt + C - 1) / C;
    return p > N ? (N > 0 ? N : 1) : p;
}

/* Chan merge of (nb, mb, qb) into (cnt, mean, m2). */
#define CHAN_MERGE(cnt, mean, m2, nb, mb, qb)                     \
    do {                                                          \
        double tot_ = (cnt) + (nb);                               \
        double delta_ = (mb) - (mean);                            \
        (mean) += delta_ * (nb) / tot_;                           \
        (m2) += (qb) + delta_ * delta_ * (cnt) * (nb) / tot_;     \
        (cnt) = tot_;                                             \
    } while (0)

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(name) CAT(name, S)

/* The activations of the bn_act_* functions (relu has its own path in the plain ones,
 * ACT_RELU in the whole-call bn_forward and bn_backward). */
#define ACT_IDENTITY 0
#define ACT_LEAKY 1
#define ACT_ELU 2
#define ACT_RELU 3
#define INLINE static inline __attribute__((always_inline))

/* Dispatch a call F(act, from_y) with both arguments compile-time constants, so that each
 * combination gets its own loop (vectorized where the activation allows). */
#define ACT_SWITCH(act, from_y, F)                         \
    switch ((act) * 2 + ((from_y) ? 1 : 0)) {               \
    case ACT_LEAKY * 2: F(ACT_LEAKY, 0); break;             \
    case ACT_LEAKY * 2 + 1: F(ACT_LEAKY, 1); break;         \
    case ACT_ELU * 2: F(ACT_ELU, 0); break;                 \
    case ACT_ELU * 2 + 1: F(ACT_ELU, 1); break;             \
    case ACT_IDENTITY * 2 + 1: F(ACT_IDENTITY, 1); break;   \
    default: F(ACT_IDENTITY, 0); break;                     \
    }

/* Streaming (non-temporal) stores. An ordinary store to a line not in the cache first
 * reads the line (read for ownership), so writing an output costs two passes of memory
 * traffic where the output is larger than the cache; a non-temporal store writes whole
 * lines straight to memory: one pass, and the data still to be read stays cached. On a
 * tensor in cache they are slower (the output is then written to memory and must be read
 * back from it), so a pass streams only when the bytes it moves reach bn_stream_bytes,
 * which the loader sets to the last-level cache's size (0: never). Only whole 64-byte
 * lines are streamed, each from a line-sized buffer; the partial lines at the ends of a
 * row take ordinary stores, so no line mixes both kinds. The values are the same either
 * way: the same expression computes them. */
#define LINE_BYTES 64
/* Rows shorter than this that do not consist of whole lines are written with ordinary
 * stores: their partial lines at the ends would be as many as the streamed ones. */
#define STREAM_ROW_BYTES 512
i64 bn_stream_bytes = 0;
void bn_set_stream_bytes(i64 bytes) { bn_stream_bytes = bytes > 0 ? bytes : 0; }
i64 bn_get_stream_bytes(void) { return bn_stream_bytes; }
#if defined(__SSE2__)
#define STREAMING 1
static inline void stream_line(void *q, const void *line) {
#if defined(__AVX__)
    const __m256i *v = (const __m256i *)line;
    _mm256_stream_si256((__m256i *)q, _mm256_load_si256(v));
    _mm256_stream_si256((__m256i *)q + 1, _mm256_load_si256(v + 1));
#else
    const __m128i *v = (const __m128i *)line;
    for (int k = 0; k < 4; ++k) _mm_stream_si128((__m128i *)q + k, _mm_load_si128(v + k));
#endif
}
/* Non-temporal stores are weakly ordered: each thread fences its own before the loop's
 * end (the barrier that publishes the output to the other threads and the caller). */
static inline void stream_fence(int stream) {
    if (stream) _mm_sfence();
}
#else
#define STREAMING 0
static inline void stream_line(void *q, const void *line) { memcpy(q, line, LINE_BYTES); }
static inline void stream_fence(int stream) { (void)stream; }
#endif

/* Whether a pass moving `bytes` (read and written) streams its output. */
static inline int stream_pass(i64 bytes) {
    return STREAMING && bn_stream_bytes > 0 && bytes >= bn_stream_bytes;
}

/* Elements of `size` bytes from q to its first line boundary (at most n; n when q is not
 * aligned to its element size, which leaves the whole row to ordinary stores). */
static inline i64 line_head(const void *q, i64 n, i64 size) {
    const uintptr_t address = (uintptr_t)q;
    if (address % (uintptr_t)size) return n;
    const i64 head = (i64)((LINE_BYTES - address % LINE_BYTES) % LINE_BYTES) / size;
    return head < n ? head : n;
}

/* Whether a row of n elements of `size` bytes at q streams: when it is whole lines, or
 * long enough (STREAM_ROW_BYTES) that its partial lines at the ends are few among the
 * whole ones. Sets *head to the elements before the first line boundary. */
static inline int stream_row(const void *q, i64 n, i64 size, i64 *head) {
    const i64 h = line_head(q, n, size);
    if (h == n) return 0; /* no line boundary in the row (or q is not element-aligned) */
    const int whole = h == 0 && ((n * size) % LINE_BYTES) == 0;
    if (!whole && n * size < STREAM_ROW_BYTES) return 0;
    *head = h;
    return 1;
}

/* q[j] = (EXPR) for j in [0, n) (EXPR an expression in the i64 j); with `stream`, the
 * whole lines of q with streaming stores, the values before the first and after the last
 * with ordinary ones (one loop serves both ends, and the whole row when not streaming).
 * The macro's own names end in an underscore: j and EXPR must use none of them. */
#define WRITE_ROW(stream, q, n, j, EXPR)                                                  \
    do {                                                                                  \
        i64 head_ = (n), from_ = (n); /* ordinary stores on [0, head_) and [from_, n) */  \
        if ((stream) && stream_row((q), (n), (i64)sizeof(*(q)), &head_)) {                \
            enum { LINE_VALUES_ = LINE_BYTES / sizeof(*(q)) };                            \
            for (from_ = head_; from_ + LINE_VALUES_ <= (n); from_ += LINE_VALUES_) {     \
                __typeof__(*(q)) line_[LINE_VALUES_] __attribute__((aligned(LINE_BYTES))); \
                _Pragma("omp simd")                                                       \
                for (i64 in_line_ = 0; in_line_ < LINE_VALUES_; ++in_line_) {             \
                    const i64 j = from_ + in_line_;                                       \
                    line_[in_line_] = (EXPR);                                             \
                }                                                                         \
                stream_line((q) + from_, line_);                                          \
            }                                                                             \
        }                                                                                 \
        for (int end_ = 0; end_ < 2; ++end_) {                                            \
            const i64 lo_ = end_ ? from_ : 0, hi_ = end_ ? (n) : head_;                   \
            _Pragma("omp simd")                                                           \
            for (i64 j = lo_; j < hi_; ++j) (q)[j] = (EXPR);                              \
        }                                                                                 \
    } while (0)

/* dst = src, n bytes, whole lines with streaming stores: the fastest a pass that reads
 * one tensor and writes another can go (bnkit.bench's bandwidth floor). */
void bn_stream_copy(const uint8_t *src, uint8_t *dst, i64 n, int nt) {
    const i64 block = 1 << 16;
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        _Pragma("omp for schedule(static) nowait")
        for (i64 start = 0; start < n; start += block) {
            const uint8_t *from = src + start;
            uint8_t *to = dst + start;
            WRITE_ROW(1, to, min64(block, n - start), j, from[j]);
        }
        stream_fence(1);
    }
}

/* exp(z) - 1 and log(1 + u) in float arithmetic that the compiler vectorizes (libm's
 * expm1f and log1pf are scalar calls, which made the fused elu 2.5x slower than torch's
 * vectorized one). Both stay within 2 ulp of the exact value (tests/kernels/test_cpu.py
 * measures them against float64 across their range) and propagate NaN. */

/* expm1 for z <= 88 (the fused elu needs z <= 0; larger z give expm1(88)):
 * z = k ln2 + r with |r| <= ln2 / 2, and exp(z) - 1 = 2^k expm1(r) + (2^k - 1), where
 * 2^k - 1 is exact for k >= -24 and rounds to -1 below, as the result does. expm1(r) is
 * its Taylor polynomial to r^7 (the next term is under 1e-8 r). */
static inline __attribute__((always_inline)) float bn_expm1f(float z) {
    const float zc = z < -88.0f ? -88.0f : (z > 88.0f ? 88.0f : z);
    const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float kf = (zc * 1.44269504f + round) - round;
    const float r = (zc - kf * 0.693145751953125f) - kf * 1.428606820e-6f; /* ln2 in two */
    const float p =
        r + r * r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                                                r * (1.0f / 720 + r * (1.0f / 5040))))));
    const int32_t bits = ((int32_t)kf + 127) << 23;
    float scale; /* 2^k (0 for k = -127, where the result is -1) */
    memcpy(&scale, &bits, sizeof scale);
    const float result = scale * p + (scale - 1.0f);
    return z != z ? z : result;
}

/* log1p for u >= -1 (NaN below): m = 1 + u = 2^e f with sqrt(1/2) <= f < sqrt(2), and with
 * x = f - 1 (exact), s = x / (2 + x), log f = 2 atanh(s) = 2s + s R(s^2) (series to s^9,
 * |s| <= 0.172) = x - (x^2/2 - s (x^2/2 + R)), so that the largest term is added last.
 * The rounding of 1 + u is undone by adding (u - (m - 1)) / m (m - 1 is exact). */
static inline __attribute__((always_inline)) float bn_log1pf(float u) {
    const float m = 1.0f + u;
    int32_t bits;
    memcpy(&bits, &m, sizeof bits);
    const int32_t half_root = 0x3f3504f3; /* sqrt(1/2) */
    bits += 0x3f800000 - half_root;
    const float e = (float)((bits >> 23) - 127);
    bits = (bits & 0x007fffff) + half_root;
    float f;
    memcpy(&f, &bits, sizeof f);
    const float x = f - 1.0f, s = x / (2.0f + x), z = s * s;
    const float r = z * (2.0f / 3 + z * (2.0f / 5 + z * (2.0f / 7 + z * (2.0f / 9))));
    const float half_square = 0.5f * x * x;
    const float log_f = x - (half_square - s * (half_square + r));
    const float correction = (u - (m - 1.0f)) / m;
    const float result = e * 0.693145751953125f + ((log_f + correction) + e * 1.428606820e-6f);
    return m > 0.0f ? (m < INFINITY ? result : m) : (m == 0.0f ? -INFINITY : NAN);
}

/* The number of nonzero bytes among n: a mask's valid positions. */
static i64 bn_valid_count(const uint8_t *mask, i64 n) {
    i64 count = 0;
    _Pragma("omp simd reduction(+ : count)")
    for (i64 i = 0; i < n; ++i) count += mask[i] != 0;
    return count;
}

/* The running-statistics update below, declared for the one-call paths of the template. */
int bn_update_running_f32(const float *shift, const float *smean, const float *var, i64 C,
                          double count, void *running_mean, void *running_var,
                          int running_double, double momentum, int64_t *tracked, int unbiased,
                          int skip_nonfinite);
int bn_update_running_f64(const double *shift, const double *smean, const double *var, i64 C,
                          double count, void *running_mean, void *running_var,
                          int running_double, double momentum, int64_t *tracked, int unbiased,
                          int skip_nonfinite);

/* Each instantiation: T, the compute type (per-channel values, saved statistics, weights);
 * D, the element type of the tensors (x, y, g, dx), read with LD and written with STO;
 * S, the suffix; CS, the suffix of T's running-statistics update. HALF_DATA instances
 * (16-bit data, float compute) have every function, masks and fused activations included;
 * some reductions sum in T rather than double for them (see bn_backward_reduce_ncl). */
/* float and double data: read and written as they are */
#define LD(v) (v)
#define STO(v) (v)
#define HALF_DATA 0
#define STAGED 0
#define T float
#define D float
#define S f32
#define CS f32
#define EXPM1 bn_expm1f
#define LOG1P bn_log1pf
#define SQRT sqrtf
#include __FILE__
#undef T
#undef D
#undef S
#undef CS
#undef EXPM1
#undef LOG1P
#undef SQRT
#define T double
#define D double
#define S f64
#define CS f64
#define EXPM1 expm1
#define LOG1P log1p
#define SQRT sqrt
#include __FILE__
#undef T
#undef D
#undef S
#undef CS
#undef EXPM1
#undef LOG1P
#undef SQRT
#undef LD
#undef STO
#undef HALF_DATA

/* bfloat16: the upper half of a float; stored rounding to nearest even, NaN as 0x7fc0
 * (torch's conversion, bit for bit). */
static inline float bf16_load(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((int32_t)(u & 0x7fffffffu) > 0x7f800000) return 0x7fc0; /* NaN (a signed compare) */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* float16 (IEEE binary16) in integer operations, so that the loops vectorize on any x86
 * (no F16C or _Float16 needed). Load: the exponent and mantissa moved into place and
 * scaled by 2^112 (the bias difference; exact, subnormals included), Inf and NaN kept.
 * Store: round to nearest even; overflow to Inf, NaN to 0x7e00, subnormals through a
 * float addition that rounds at the subnormal's last place. */
static inline float f16_load(uint16_t h) {
    const uint32_t em = (uint32_t)h & 0x7fffu, sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t u = em << 13;
    float f;
    memcpy(&f, &u, sizeof f);
    f *= 0x1p112f;
    memcpy(&u, &f, sizeof u);
    if ((int32_t)em >= 0x7c00) u = (em << 13) | 0x7f800000u; /* Inf, NaN (signed compares:
                                                                AVX2 has no unsigned ones) */
    u |= sign;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint16_t f16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint32_t o;
    const int32_t magnitude = (int32_t)u; /* sign cleared: signed compares are exact */
    if (magnitude >= 0x47800000) { /* >= 65536 before rounding: Inf, or NaN */
        o = magnitude > 0x7f800000 ? 0x7e00u : 0x7c00u;
    } else if (magnitude < 0x38800000) { /* below 2^-14: subnormal or zero */
        const uint32_t magic_bits = 0x3f000000u; /* 0.5: its last place is 2^-24 */
        float magic, t;
        memcpy(&magic, &magic_bits, sizeof magic);
        memcpy(&t, &u, sizeof t);
        t += magic;
        memcpy(&o, &t, sizeof o);
        o -= magic_bits;
    } else {
        const uint32_t odd = (u >> 13) & 1u;
        o = (u + 0xc8000fffu + odd) >> 13; /* rebias (15 - 127) << 23, round half even */
    }
    return (uint16_t)(o | (sign >> 16));
}

/* float16 rows converted with the F16C instructions, for the passes that read and write
 * float16 (MAP_ROW1/2): the compiler vectorizes f16_load and f16_store in integer
 * operations, and a loop doing both with the arithmetic ran at about a third of the speed
 * of either alone; converting a chunk of the rows in a loop of its own, computing in float
 * on the chunk and converting the results back halved the eval pass on 4096x1024 float16.
 * The passes that only read float16 (the reductions) keep f16_load: staging their loads
 * measured slower. The values are f16_load's and f16_store's, bit for bit (checked over
 * every float32 and every float16): the conversions are exact or round to nearest even,
 * and a NaN is stored as 0x7e00 with its sign, as f16_store stores it (a signalling NaN
 * loads quiet, which no result can tell). */
#if defined(__F16C__) && defined(__AVX__)
#define F16C_ROWS 1
static inline void f16_row_load(float *dst, const uint16_t *src, i64 n) {
    i64 i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i,
                         _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#endif
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; ++i) dst[i] = f16_load(src[i]);
}
static inline void f16_row_store(uint16_t *dst, const float *src, i64 n) {
    i64 i = 0;
#if defined(__AVX512F__)
    const __m512i sign16 = _mm512_set1_epi32(INT32_MIN), quiet16 = _mm512_set1_epi32(0x7fc00000);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(src + i);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        const __m512i canonical =
            _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign16), quiet16);
        const __m512 w = _mm512_mask_blend_ps(nan, v, _mm512_castsi512_ps(canonical));
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
    const __m256 sign = _mm256_set1_ps(-0.0f), quiet = _mm256_set1_ps(NAN);
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(src + i);
        const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        const __m256 w = _mm256_blendv_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), quiet), nan);
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; ++i) dst[i] = f16_store(src[i]);
}
/* LD in the float16 loops: a float16 value, or a float already converted from a chunk. */
#ifdef __cplusplus
extern "C++" {
static inline float f16_value(uint16_t h) { return f16_load(h); }
static inline float f16_value(float f) { return f; }
}
#define F16_LD(v) f16_value(v)
#else
#define F16_LD(v) _Generic((v), float: (v), default: f16_load(v))
#endif
#else
#define F16C_ROWS 0
#define F16_LD(v) f16_load(v)
#endif

/* 16-bit data, computed in float */
#define T float
#define D uint16_t
#define CS f32
#define HALF_DATA 1
#define SQRT sqrtf
#define EXPM1 bn_expm1f
#define LOG1P bn_log1pf
#define S bf16
#define LD(v) bf16_load(v)
#define STO(v) bf16_store(v)
#include __FILE__
#undef S
#undef LD
#undef STO
#undef STAGED
#define S f16
#define LD(v) F16_LD(v)
#define STO(v) f16_store(v)
#define STAGED F16C_ROWS
#include __FILE__
#undef S
#undef LD
#undef STO
#undef STAGED
#undef T
#undef D
#undef CS
#undef HALF_DATA
#undef SQRT
#undef EXPM1
#undef LOG1P

/* Running statistics, in place: new = batch * factor + old * (1 - factor) in double, with
 * batch_mean = shift + shifted_mean and batch_var = var (* count / (count - 1) if unbiased);
 * factor = momentum, or 1 / num_batches_tracked (after its increment) when momentum < 0.
 * With skip_nonfinite a batch with a NaN or Inf statistic changes nothing. The running
 * arrays are float (running_double 0) or double (1). Returns whether it was recorded. */
#define BN_UPDATE(T, S)                                                                     \
    int bn_update_running_##S(const T *shift, const T *smean, const T *var, i64 C,          \
                              double count, void *running_mean, void *running_var,          \
                              int running_double, double momentum, int64_t *tracked,        \
                              int unbiased, int skip_nonfinite) {                           \
        int recorded = 1;                                                                   \
        if (skip_nonfinite) {                                                               \
            for (i64 c = 0; c < C; ++c) {                                                   \
                double m = (double)shift[c] + (double)smean[c], v = (double)var[c];         \
                if (unbiased) v = v * count / (count - 1.0);                                \
                if (!isfinite(m) || !isfinite(v)) recorded = 0;                             \
            }                                                                               \
        }                                                                                   \
        if (tracked) *tracked += recorded;                                                  \
        double factor = momentum >= 0.0 ? momentum : 1.0 / (double)(tracked ? *tracked : 1); \
        if (!recorded) return 0;                                                            \
        for (i64 c = 0; c < C; ++c) {                                                       \
            double m = (double)shift[c] + (double)smean[c], v = (double)var[c];             \
            if (unbiased) v = v * count / (count - 1.0);                                    \
            for (int which = 0; which < 2; ++which) {                                       \
                void *running = which ? running_var : running_mean;                         \
                double batch = which ? v : m;                                               \
                if (!running) continue;                                                     \
                if (running_double) {                                                       \
                    double *r = (double *)running;                                          \
                    r[c] = batch * factor + r[c] * (1.0 - factor);                          \
                } else {                                                                    \
                    float *r = (float *)running;                                            \
                    r[c] = (float)(batch * factor + (double)r[c] * (1.0 - factor));         \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        return 1;                                                                           \
    }
BN_UPDATE(float, f32)
BN_UPDATE(double, f64)
#ifdef __cplusplus
}
#endif

#else /* BN_TEMPLATE: the kernels for one element type T, suffix S */
/* max(z, 0) with NaN kept; and g where the pre-activation z is positive, else 0 (the
 * gradient is loaded unconditionally: a select, no branch). */
#undef RELU
#undef RELU_GRAD
#define RELU(z) ({ const T z_ = (z); z_ < (T)0 ? (T)0 : z_; })
#define RELU_GRAD(g, z) ({ const T g_ = (g); (z) > (T)0 ? g_ : (T)0; })
/* q[j] = STO(EXPR) for j in [0, n), as WRITE_ROW; EXPR, in T, reads the row P (MAP_ROW1)
 * or the rows P1 and P2 (MAP_ROW2) with LD. With STAGED (float16 data and F16C), a chunk
 * at a time: the rows' values converted to float, EXPR on them (the row names then name
 * the float chunks, which LD reads as they are), the results converted back and written. */
#undef MAP_ROW1
#undef MAP_ROW2
#if STAGED
#define STAGE_VALUES 256
#define STAGED_CHUNKS(stream, q, n, ...)                                                   \
    do {                                                                                   \
        for (i64 c0_ = 0; c0_ < (n); c0_ += STAGE_VALUES) {                                \
            const i64 m_ = min64(STAGE_VALUES, (n) - c0_);                                  \
            float out_[STAGE_VALUES];                                                      \
            uint16_t half_[STAGE_VALUES];                                                  \
            { __VA_ARGS__ }                                                                \
            if (stream) {                                                                  \
                f16_row_store(half_, out_, m_);                                            \
                WRITE_ROW(1, (q) + c0_, m_, h_, half_[h_]);                                \
            } else {                                                                       \
                f16_row_store((q) + c0_, out_, m_);                                        \
            }                                                                              \
        }                                                                                  \
    } while (0)
/* the chunk of row P as floats in `chunk`, then P names it, indexed as the row is (a
 * pointer c0_ values before the chunk, read only at c0_ .. c0_ + m_ - 1) */
#define STAGED_ROW(P, chunk)                                                               \
    float chunk[STAGE_VALUES];                                                             \
    f16_row_load(chunk, (P) + c0_, m_);                                                    \
    const float *const P = chunk - c0_;
#define STAGED_MAP(j, EXPR)                                                                \
    _Pragma("omp simd") for (i64 j = c0_; j < c0_ + m_; ++j) out_[j - c0_] = (EXPR);
#define MAP_ROW1(stream, q, n, j, P, EXPR)                                                 \
    STAGED_CHUNKS(stream, q, n, STAGED_ROW(P, one_) STAGED_MAP(j, EXPR))
#define MAP_ROW2(stream, q, n, j, P1, P2, EXPR)                                            \
    STAGED_CHUNKS(stream, q, n, STAGED_ROW(P1, one_) STAGED_ROW(P2, two_) STAGED_MAP(j, EXPR))
#else
#define MAP_ROW1(stream, q, n, j, P, EXPR) WRITE_ROW(stream, q, n, j, STO(EXPR))
#define MAP_ROW2(stream, q, n, j, P1, P2, EXPR) WRITE_ROW(stream, q, n, j, STO(EXPR))
#endif
/* Statistics, ncl layout: shift = x[0, c, 0]; shifted mean and biased variance. */
void NAME(bn_stats_ncl)(const D *x, i64 N, i64 C, i64 L, T *shift, T *smean, T *var,
                      int nt) {
    if (sizeof(T) == sizeof(float)) {
        /* float input: walk memory in order, each thread over a range of (n, c) rows,
         * with per-channel shifted sums in double (x - s is exact in double, and
         * M2 = sum d^2 - (sum d)^2 / n loses about (1 + t^2) * 1e-16 relative for a shift
         * t standard deviations from the mean, far below float32 rounding). Short rows
         * (7x7 maps) are read in memory order too: per channel they would be scattered. */
        i64 R = N * C, P = nt < 1 ? 1 : nt;
        if (P > R) P = R;
        double *acc = (double *)calloc((size_t)(2 * C * P), sizeof(double));
        _Pragma("omp parallel for num_threads(nt) schedule(static, 1) if(nt > 1)")
        for (i64 part = 0; part < P; ++part) {
            double *sum = acc + 2 * C * part, *sq = sum + C;
            for (i64 row = R * part / P; row < R * (part + 1) / P; ++row) {
                i64 c = row % C;
                const D *p = x + row * L;
                const double sc = (double)LD(x[c * L]);
                double as[LANES] = {0.0}, aq[LANES] = {0.0};
                double ts = 0.0, tq = 0.0;
                i64 i = 0;
                if (L < 4 * LANES) { /* short rows: one vector accumulator each */
                    _Pragma("omp simd reduction(+ : ts, tq)")
                    for (i64 k = 0; k < L; ++k) {
                        double d = (double)LD(p[k]) - sc;
                        ts += d;
                        tq += d * d;
                    }
                    sum[c] += ts;
                    sq[c] += tq;
                    continue;
                }
                for (; i + LANES <= L; i += LANES) {
                    _Pragma("omp simd")
                    for (int j = 0; j < LANES; ++j) {
                        double d = (double)LD(p[i + j]) - sc;
                        as[j] += d;
                        aq[j] += d * d;
                    }
                }
                for (; i < L; ++i) {
                    double d = (double)LD(p[i]) - sc;
                    ts += d;
                    tq += d * d;
                }
                for (int j = 0; j < LANES; ++j) ts += as[j], tq += aq[j];
                sum[c] += ts;
                sq[c] += tq;
            }
        }
        const double n = (double)(N * L);
        for (i64 c = 0; c < C; ++c) {
            double ts = 0.0, tq = 0.0;
            for (i64 part = 0; part < P; ++part) ts += acc[2 * C * part + c],
                                                 tq += acc[2 * C * part + C + c];
            double mean = ts / n, m2 = tq - ts * mean;
            shift[c] = LD(x[c * L]);
            smean[c] = (T)mean;
            var[c] = (T)((m2 > 0.0 ? m2 : 0.0) / n);
        }
        free(acc);
        return;
    }

    /* double data (float compute types returned above): per channel, split into parts of
     * the batch when channels are few, Chan-merged blocks of exact two-pass statistics. */
    i64 P = parts_for(C, N, nt);
    double *pc = (double *)malloc(sizeof(double) * 3 * C * P);
    double *pm = pc + C * P, *pq = pm + C * P;
    i64 rows = L >= BLOCK ? 1 : BLOCK / (L > 0 ? L : 1);
    _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 1) if(nt > 1)")
    for (i64 item = 0; item < C * P; ++item) {
        i64 c = item / P, part = item % P;
        i64 n_begin = N * part / P, n_end = N * (part + 1) / P;
        double s = (double)LD(x[c * L]);
        double cnt = 0.0, mean = 0.0, m2 = 0.0;
        for (i64 n0 = n_begin; n0 < n_end; n0 += rows) {
            i64 n1 = min64(n_end, n0 + rows);
            double nb = (double)((n1 - n0) * L);
            /* exact two-pass on the block (cache-resident) */
            double sum = 0.0;
            for (i64 n = n0; n < n1; ++n) {
                const D *p = x + (n * C + c) * L;
                _Pragma("omp simd reduction(+ : sum)")
                for (i64 i = 0; i < L; ++i) sum += (double)LD(p[i]) - s;
            }
            const double mb = sum / nb;
            double q = 0.0;
            for (i64 n = n0; n < n1; ++n) {
                const D *p = x + (n * C + c) * L;
                _Pragma("omp simd reduction(+ : q)")
                for (i64 i = 0; i < L; ++i) {
                    double d = ((double)LD(p[i]) - s) - mb;
                    q += d * d;
                }
            }
            CHAN_MERGE(cnt, mean, m2, nb, mb, q);
        }
        pc[item] = cnt;
        pm[item] = mean;
        pq[item] = m2;
    }
    for (i64 c = 0; c < C; ++c) {
        double cnt = 0.0, mean = 0.0, m2 = 0.0;
        for (i64 part = 0; part < P; ++part) {
            i64 item = c * P + part;
            if (pc[item] > 0) CHAN_MERGE(cnt, mean, m2, pc[item], pm[item], pq[item]);
        }
        shift[c] = LD(x[c * L]);
        smean[c] = (T)mean;
        var[c] = (T)(m2 / cnt);
    }
    free(pc);
}

/* Statistics, nc layout: shift = x[0, c]. Each thread takes a range of rows in blocks
 * of NC_SUM_ROWS, one row at a time, summing d = x - ref and d^2 in T, where ref is the
 * per-channel mean of the rows seen so far (the shift for the first block); after each
 * block, its count, mean and M2 = sum d^2 - (sum d)^2 / n go into per-channel double
 * (count, mean, M2) by Chan, Golub and LeVeque's update, and ref moves to the new mean.
 * Sums in T keep float lanes twice as many as double ones and free of conversions (the
 * loop is then memory-bound, not arithmetic-bound); one pass, no second read of a block.
 * Accuracy: a block's sums err by a few NC_SUM_ROWS roundings of sum d^2, and the
 * cancellation in its M2 is only as large as (block mean - ref)^2 is against the spread,
 * where ref is within a fraction of a standard deviation of the mean after the first
 * block: the variance errs by ~1e-6 relative to itself at worst, never by E[x^2]. */
static void NAME(stats_nc_rows)(const D *x, const uint8_t *mask, i64 M, i64 C, T *shift,
                                T *smean, T *var, double *count, int nt) {
    /* The shift: the first valid row (the first row without a mask). */
    i64 first = 0;
    if (mask)
        while (first < M && !mask[first]) ++first;
    if (first == M) { /* nothing valid: no statistics (0 / 0, as the portable kernel) */
        for (i64 c = 0; c < C; ++c) shift[c] = smean[c] = var[c] = (T)NAN;
        *count = 0.0;
        return;
    }
    const D *s0 = x + first * C;
    i64 P = M < nt ? (M > 0 ? M : 1) : nt;
    if (P < 1) P = 1;
    double *acc = (double *)calloc((size_t)(2 * C * P + P), sizeof(double));
    T *blk = (T *)malloc(sizeof(T) * (size_t)(3 * C * P));
    _Pragma("omp parallel for num_threads(nt) schedule(static, 1) if(nt > 1)")
    for (i64 part = 0; part < P; ++part) {
        double *mean = acc + 2 * C * part, *m2 = mean + C; /* mean relative to the shift */
        double *cnt = acc + 2 * C * P + part;
        T *ref = blk + 3 * C * part, *bs = ref + C, *bq = bs + C;
        for (i64 c = 0; c < C; ++c) ref[c] = LD(s0[c]);
        const i64 r_end = M * (part + 1) / P;
        for (i64 r0 = M * part / P; r0 < r_end; r0 += NC_SUM_ROWS) {
            const i64 r1 = min64(r_end, r0 + NC_SUM_ROWS);
            for (i64 c = 0; c < C; ++c) bs[c] = (T)0, bq[c] = (T)0;
            i64 valid = 0;
            for (i64 r = r0; r < r1; ++r) {
                if (mask && !mask[r]) continue; /* padding: not in the statistics */
                ++valid;
                const D *p = x + r * C;
                _Pragma("omp simd")
                for (i64 c = 0; c < C; ++c) {
                    const T d = LD(p[c]) - ref[c];
                    bs[c] += d;
                    bq[c] += d * d;
                }
            }
            if (!valid) continue;
            /* Chan's merge; the count is the same for every channel, so the weights are
             * scalars (no division per channel). */
            const double nb = (double)valid, n0 = *cnt, tot = n0 + nb;
            const double inv = 1.0 / nb, w = nb / tot, w2 = n0 * nb / tot;
            _Pragma("omp simd")
            for (i64 c = 0; c < C; ++c) {
                const double sh = (double)LD(s0[c]), sum = (double)bs[c];
                const double mb = sum * inv, qb = (double)bq[c] - sum * mb;
                const double delta = ((double)ref[c] - sh) + mb - mean[c];
                mean[c] += delta * w;
                m2[c] += (qb > 0.0 ? qb : 0.0) + delta * delta * w2;
                ref[c] = (T)(sh + mean[c]);
            }
            *cnt = tot;
        }
    }
    double total = 0.0;
    for (i64 c = 0; c < C; ++c) {
        double cnt = 0.0, mean = 0.0, m2 = 0.0;
        for (i64 part = 0; part < P; ++part) {
            const double pc = acc[2 * C * P + part];
            if (pc > 0)
                CHAN_MERGE(cnt, mean, m2, pc, acc[2 * C * part + c], acc[2 * C * part + C + c]);
        }
        shift[c] = LD(s0[c]);
        smean[c] = (T)mean;
        var[c] = (T)(m2 / cnt);
        total = cnt;
    }
    *count = total;
    free(blk);
    free(acc);
}

void NAME(bn_stats_nc)(const D *x, i64 M, i64 C, T *shift, T *smean, T *var, int nt) {
    double count;
    NAME(stats_nc_rows)(x, NULL, M, C, shift, smean, var, &count, nt);
}

/* Masked statistics, nc layout: only rows r with mask[r] (one byte, 0 or 1) count; the
 * shift is the first valid row; *count receives the number of valid rows. */
void NAME(bn_stats_masked_nc)(const D *x, const uint8_t *mask, i64 M, i64 C, T *shift,
                              T *smean, T *var, double *count, int nt) {
    NAME(stats_nc_rows)(x, mask, M, C, shift, smean, var, count, nt);
}

/* Masked statistics, ncl layout: value (n, c, l) counts where mask[n * L + l]. The shift
 * is x at the first valid (n, l); *count receives the number of valid (n, l). Each thread
 * walks a range of (n, c) rows in memory order. float data: one pass of shifted sums in
 * double (as the unmasked ncl statistics); double data: two passes, the second about the
 * mean of the first (exact to rounding). */
void NAME(bn_stats_masked_ncl)(const D *x, const uint8_t *mask, i64 N, i64 C, i64 L,
                               T *shift, T *smean, T *var, double *count, int nt) {
    i64 first = 0, NL = N * L;
    while (first < NL && !mask[first]) ++first;
    if (first == NL) {
        for (i64 c = 0; c < C; ++c) shift[c] = smean[c] = var[c] = (T)NAN;
        *count = 0.0;
        return;
    }
    double valid = 0.0;
    /* any nonzero byte is True (a bool view of other bytes), as torch reads a mask */
    for (i64 i = 0; i < NL; ++i) valid += mask[i] != 0;
    const i64 n_first = first / L, l_first = first % L;
    i64 R = N * C, P = nt < 1 ? 1 : nt;
    if (P > R) P = R;
    double *acc = (double *)calloc((size_t)(3 * C * P + C), sizeof(double));
    double *sd = acc + 3 * C * P;
    for (i64 c = 0; c < C; ++c) sd[c] = (double)LD(x[(n_first * C + c) * L + l_first]);
    const int two_pass = sizeof(T) == sizeof(double);
    for (int pass = 0; pass < 1 + two_pass; ++pass) {
        /* pass 0: sums of d = x - s (and d^2 for float); pass 1 (double): sums of
         * (d - mean)^2, the mean from pass 0 kept in acc's last C slots of each part */
        _Pragma("omp parallel for num_threads(nt) schedule(static, 1) if(nt > 1)")
        for (i64 part = 0; part < P; ++part) {
            double *sum = acc + 3 * C * part, *sq = sum + C, *ctr = sq + C;
            for (i64 row = R * part / P; row < R * (part + 1) / P; ++row) {
                const i64 c = row % C, n = row / C;
                const D *p = x + row * L;
                const uint8_t *mk = mask + n * L;
                const double sc = sd[c], cc = ctr[c];
                double ts = 0.0, tq = 0.0;
                if (pass == 0) {
                    _Pragma("omp simd reduction(+ : ts, tq)")
                    for (i64 i = 0; i < L; ++i) {
                        const double d = mk[i] ? (double)LD(p[i]) - sc : 0.0;
                        ts += d;
                        tq += d * d;
                    }
                    sum[c] += ts;
                    sq[c] += tq;
                } else {
                    _Pragma("omp simd reduction(+ : tq)")
                    for (i64 i = 0; i < L; ++i) {
                        const double e = mk[i] ? ((double)LD(p[i]) - sc) - cc : 0.0;
                        tq += e * e;
                    }
                    sq[c] += tq;
                }
            }
        }
        for (i64 c = 0; c < C; ++c) {
            double ts = 0.0, tq = 0.0;
            for (i64 part = 0; part < P; ++part) ts += acc[3 * C * part + c],
                                                 tq += acc[3 * C * part + C + c];
            const double mean = pass == 0 ? ts / valid : acc[2 * C + c];
            if (pass == 0 && two_pass) { /* the mean for pass 1; sums of squares restart */
                for (i64 part = 0; part < P; ++part) {
                    acc[3 * C * part + 2 * C + c] = mean;
                    acc[3 * C * part + C + c] = 0.0;
                }
                continue;
            }
            const double m2 = two_pass ? tq : tq - ts * mean;
            shift[c] = (T)sd[c];
            smean[c] = (T)mean;
            var[c] = (T)((m2 > 0.0 ? m2 : 0.0) / valid);
        }
    }
    *count = valid;
    free(acc);
}


/* y = (x - s) * a + b per channel, then max(y, 0) if relu (NaN kept). ncl layout. */
void NAME(bn_affine_ncl)(const D *x, D *y, i64 N, i64 C, i64 L, const T *s, const T *a,
                       const T *b, int relu, int nt) {
    const int stream = stream_pass(2 * N * C * L * (i64)sizeof(D));
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        _Pragma("omp for schedule(static) nowait")
        for (i64 row = 0; row < N * C; ++row) {
            i64 c = row % C;
            const T sc = s[c], ac = a[c], bc = b[c];
            const D *p = x + row * L;
            D *q = y + row * L;
            if (relu)
                MAP_ROW1(stream, q, L, i, p, RELU((LD(p[i]) - sc) * ac + bc));
            else
                MAP_ROW1(stream, q, L, i, p, (LD(p[i]) - sc) * ac + bc);
        }
        stream_fence(stream);
    }
}

/* The same map, nc layout, one row at a time (one stream in, one out: interleaving
 * several rows measured 1.4x slower, the hardware prefetcher follows one stream best). */
void NAME(bn_affine_nc)(const D *x, D *y, i64 M, i64 C, const T *s, const T *a, const T *b,
                      int relu, int nt) {
    const int stream = stream_pass(2 * M * C * (i64)sizeof(D));
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        _Pragma("omp for schedule(static) nowait")
        for (i64 r = 0; r < M; ++r) {
            const D *p = x + r * C;
            D *q = y + r * C;
            if (relu)
                MAP_ROW1(stream, q, C, c, p, RELU((LD(p[c]) - s[c]) * a[c] + b[c]));
            else
                MAP_ROW1(stream, q, C, c, p, (LD(p[c]) - s[c]) * a[c] + b[c]);
        }
        stream_fence(stream);
    }
}

/* Backward reductions, ncl layout: sum_g = sum(g'), sum_gc = sum(g' * (x - s - m)),
 * with g' = g, or g where (x - s) * za + zb > 0 when za is given (fused relu). */
void NAME(bn_backward_reduce_ncl)(const D *g, const D *x, i64 N, i64 C, i64 L, const T *s,
                                const T *m, const T *za, const T *zb, double *sum_g,
                                double *sum_gc, int nt) {
    /* Memory order: each thread a range of (n, c) rows, per-channel sums of g' and
     * g' (x - s) in double; the centring by m is per channel, at the end. */
    i64 R = N * C, P = nt < 1 ? 1 : nt;
    if (P > R) P = R;
    if (P < 1) P = 1;
    double *acc = (double *)calloc((size_t)(2 * C * P), sizeof(double));
    T *ref = (T *)malloc(sizeof(T) * (size_t)(C > 0 ? C : 1));
    for (i64 c = 0; c < C; ++c) ref[c] = (T)((double)s[c] + (double)m[c]);
    _Pragma("omp parallel for num_threads(nt) schedule(static, 1) if(nt > 1)")
    for (i64 part = 0; part < P; ++part) {
        double *ag = acc + 2 * C * part, *agc = ag + C;
        for (i64 row = R * part / P; row < R * (part + 1) / P; ++row) {
            i64 c = row % C;
            const D *gp = g + row * L, *xp = x + row * L;
            const double sc = (double)s[c];
            double tg = 0.0, tgc = 0.0;
            if (za && (HALF_DATA || L < 4 * LANES)) { /* sums in T, as below */
                const T ts = s[c], ta = za[c], tb = zb[c], rc = ref[c];
                for (i64 i0 = 0; i0 < L; i0 += ROW_CHUNK) {
                    const i64 i1 = min64(L, i0 + ROW_CHUNK);
                    T fg = (T)0, fgc = (T)0;
                    _Pragma("omp simd reduction(+ : fg, fgc)")
                    for (i64 i = i0; i < i1; ++i) {
                        const T z = (LD(xp[i]) - ts) * ta + tb;
                        const T gv = LD(gp[i]); /* loaded unconditionally: a select */
                        const T gt = z > (T)0 ? gv : (T)0;
                        fg += gt;
                        fgc += gt * (LD(xp[i]) - rc);
                    }
                    tg += (double)fg;
                    tgc += (double)fgc + ((double)rc - sc) * (double)fg;
                }
            } else if (za) {
                const T ts = s[c], ta = za[c], tb = zb[c];
                _Pragma("omp simd reduction(+ : tg, tgc)")
                for (i64 i = 0; i < L; ++i) {
                    T z = (LD(xp[i]) - ts) * ta + tb;
                    const T gv = LD(gp[i]); /* loaded unconditionally: a select, no branch */
                    T gt = z > (T)0 ? gv : (T)0;
                    double gi = (double)gt;
                    tg += gi;
                    tgc += gi * ((double)LD(xp[i]) - sc);
                }
            } else if (HALF_DATA || L < 4 * LANES) {
                /* short rows (7x7 maps), and 16-bit data (whose loop double sums would make
                 * arithmetic-bound): summed in T in chunks of at most ROW_CHUNK values,
                 * about the batch mean rc = s + m rounded to T (terms centred: at most
                 * ROW_CHUNK roundings of g' times the spread), each chunk added to double
                 * with the rounding of rc put back. */
                const T rc = ref[c];
                for (i64 i0 = 0; i0 < L; i0 += ROW_CHUNK) {
                    const i64 i1 = min64(L, i0 + ROW_CHUNK);
                    T fg = (T)0, fgc = (T)0;
                    _Pragma("omp simd reduction(+ : fg, fgc)")
                    for (i64 i = i0; i < i1; ++i) {
                        const T gi = LD(gp[i]);
                        fg += gi;
                        fgc += gi * (LD(xp[i]) - rc);
                    }
                    tg += (double)fg;
                    tgc += (double)fgc + ((double)rc - sc) * (double)fg;
                }
            } else { /* LANES independent sums, so the adds do not wait on each other */
                double lg[LANES] = {0.0}, lgc[LANES] = {0.0};
                i64 i = 0;
                for (; i + LANES <= L; i += LANES) {
                    _Pragma("omp simd")
                    for (int k = 0; k < LANES; ++k) {
                        double gi = (double)LD(gp[i + k]);
                        lg[k] += gi;
                        lgc[k] += gi * ((double)LD(xp[i + k]) - sc);
                    }
                }
                for (; i < L; ++i) {
                    double gi = (double)LD(gp[i]);
                    tg += gi;
                    tgc += gi * ((double)LD(xp[i]) - sc);
                }
                for (int k = 0; k < LANES; ++k) tg += lg[k], tgc += lgc[k];
            }
            ag[c] += tg;
            agc[c] += tgc;
        }
    }
    for (i64 c = 0; c < C; ++c) {
        double a = 0.0, b = 0.0;
        for (i64 part = 0; part < P; ++part) a += acc[2 * C * part + c],
                                             b += acc[2 * C * part + C + c];
        sum_g[c] = a;
        sum_gc[c] = b - (double)m[c] * a;
    }
    free(ref);
    free(acc);
}

/* The same reductions, nc layout. Each thread sums a range of rows, one row at a time,
 * into per-channel sums in T over blocks of NC_SUM_ROWS rows, added to double sums after
 * each block: float lanes are twice as many per vector as double ones and need no
 * conversion, which makes the loop memory-bound instead of arithmetic-bound (2.2x faster
 * measured on 32x256x56x56 channels-last). The products are taken about ref = s + m
 * rounded to T, the batch mean, so that their terms are centred (no term is larger than
 * g' times the spread); the rounding of ref is corrected in double at the end. A block's
 * float sum errs by at most NC_SUM_ROWS roundings of its terms, so dx and the parameter
 * gradients stay at float32 rounding level. */
void NAME(bn_backward_reduce_nc)(const D *g, const D *x, i64 M, i64 C, const T *s,
                               const T *m, const T *za, const T *zb, double *sum_g,
                               double *sum_gc, int nt) {
    i64 P = M < nt ? (M > 0 ? M : 1) : nt;
    double *acc = (double *)calloc((size_t)(2 * C * P), sizeof(double));
    T *blk = (T *)malloc(sizeof(T) * (size_t)(2 * C * P + C));
    T *ref = blk + 2 * C * P;
    for (i64 c = 0; c < C; ++c) ref[c] = (T)((double)s[c] + (double)m[c]);
    _Pragma("omp parallel for num_threads(nt) schedule(static, 1) if(nt > 1)")
    for (i64 part = 0; part < P; ++part) {
        double *ag = acc + 2 * C * part, *agc = ag + C;
        T *bg = blk + 2 * C * part, *bgc = bg + C;
        const i64 r_end = M * (part + 1) / P;
        for (i64 r0 = M * part / P; r0 < r_end; r0 += NC_SUM_ROWS) {
            const i64 r1 = min64(r_end, r0 + NC_SUM_ROWS);
            for (i64 c = 0; c < C; ++c) bg[c] = (T)0, bgc[c] = (T)0;
            for (i64 r = r0; r < r1; ++r) {
                const D *gp = g + r * C, *xp = x + r * C;
                if (za) {
                    _Pragma("omp simd")
                    for (i64 c = 0; c < C; ++c) {
                        const T d = LD(xp[c]) - s[c];
                        const T z = d * za[c] + zb[c];
                        const T gv = LD(gp[c]); /* loaded unconditionally: a select, no branch */
                        const T gi = z > (T)0 ? gv : (T)0;
                        bg[c] += gi;
                        bgc[c] += gi * (LD(xp[c]) - ref[c]);
                    }
                } else {
                    _Pragma("omp simd")
                    for (i64 c = 0; c < C; ++c) {
                        const T gi = LD(gp[c]);
                        bg[c] += gi;
                        bgc[c] += gi * (LD(xp[c]) - ref[c]);
                    }
                }
            }
            _Pragma("omp simd")
            for (i64 c = 0; c < C; ++c) ag[c] += (double)bg[c], agc[c] += (double)bgc[c];
        }
    }
    for (i64 c = 0; c < C; ++c) {
        double a = 0.0, b = 0.0;
        for (i64 part = 0; part < P; ++part) a += acc[2 * C * part + c],
                                             b += acc[2 * C * part + C + c];
        /* sum g' (x - s - m) = sum g' (x - ref) + (ref - s - m) sum g', in double. */
        sum_g[c] = a;
        sum_gc[c] = b + (((double)ref[c] - (double)s[c]) - (double)m[c]) * a;
    }
    free(blk);
    free(acc);
}

/* dx = g' * alpha + (x - s) * k1 + k0 per channel (g' as in the reductions). ncl. */
void NAME(bn_backward_input_ncl)(const D *g, const D *x, D *dx, i64 N, i64 C, i64 L,
                               const T *s, const T *alpha, const T *k1, const T *k0,
                               const T *za, const T *zb, int nt) {
    const int stream = stream_pass(3 * N * C * L * (i64)sizeof(D));
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        _Pragma("omp for schedule(static) nowait")
        for (i64 row = 0; row < N * C; ++row) {
            i64 c = row % C;
            const T sc = s[c], ac = alpha[c], k1c = k1[c], k0c = k0[c];
            const D *gp = g + row * L, *xp = x + row * L;
            D *dp = dx + row * L;
            if (za) {
                const T ta = za[c], tb = zb[c];
                MAP_ROW2(stream, dp, L, i, gp, xp,
                        RELU_GRAD(LD(gp[i]), (LD(xp[i]) - sc) * ta + tb) * ac +
                            ((LD(xp[i]) - sc) * k1c + k0c));
            } else {
                MAP_ROW2(stream, dp, L, i, gp, xp,
                        LD(gp[i]) * ac + ((LD(xp[i]) - sc) * k1c + k0c));
            }
        }
        stream_fence(stream);
    }
}

/* The same, nc layout, one row at a time. */
void NAME(bn_backward_input_nc)(const D *g, const D *x, D *dx, i64 M, i64 C, const T *s,
                              const T *alpha, const T *k1, const T *k0, const T *za,
                              const T *zb, int nt) {
    const int stream = stream_pass(3 * M * C * (i64)sizeof(D));
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")
    {
        _Pragma("omp for schedule(static) nowait")
        for (i64 r = 0; r < M; ++r) {
            const D *gp = g + r * C, *xp = x + r * C;
            D *dp = dx + r * C;
            if (za)
                MAP_ROW2(stream, dp, C, c, gp, xp,
                        RELU_GRAD(LD(gp[c]), (LD(xp[c]) - s[c]) * za[c] + zb[c]) * alpha[c] +
                            ((LD(xp[c]) - s[c]) * k1[c] + k0[c]));
            else
                MAP_ROW2(stream, dp, C, c, gp, xp,
                        LD(gp[c]) * alpha[c] + ((LD(xp[c]) - s[c]) * k1[c] + k0[c]));
        }
        stream_fence(stream);
    }
}

/* dx with a mask: padding reaches the statistics through nothing, so
 * dx = g * alpha + ((x - s) * k1 + k0 where valid, else 0). ncl, mask (N, L). */
void NAME(bn_backward_input_masked_ncl)(const D *g, const D *x, const uint8_t *mask, D *dx,
                                        i64 N, i64 C, i64 L, const T *s, const T *alpha,
                                        const T *k1, const T *k0, int nt) {
    _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
    for (i64 row = 0; row < N * C; ++row) {
        const i64 c = row % C;
        const T sc = s[c], ac = alpha[c], k1c = k1[c], k0c = k0[c];
        const D *gp = g + row * L, *xp = x + row * L;
        const uint8_t *mk = mask + (row / C) * L;
        D *dp = dx + row * L;
        MAP_ROW2(0, dp, L, i, gp, xp,
                 LD(gp[i]) * ac + (mk[i] ? (LD(xp[i]) - sc) * k1c + k0c : (T)0));
    }
}

/* The same, nc layout, mask (M,) over rows. */
void NAME(bn_backward_input_masked_nc)(const D *g, const D *x, const uint8_t *mask, D *dx,
                                       i64 M, i64 C, const T *s, const T *alpha, const T *k1,
                                       const T *k0, int nt) {
    _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
    for (i64 r = 0; r < M; ++r) {
        const D *gp = g + r * C, *xp = x + r * C;
        D *dp = dx + r * C;
        if (mask[r])
            MAP_ROW2(0, dp, C, c, gp, xp,
                     LD(gp[c]) * alpha[c] + ((LD(xp[c]) - s[c]) * k1[c] + k0[c]));
        else
            MAP_ROW1(0, dp, C, c, gp, LD(gp[c]) * alpha[c] + (T)0);
    }
}

/* ---- Batch norm fused with an invertible activation (identity, leaky_relu, elu). ----
 * Forward: y = act((x - s) * a + b), one pass. Backward from the saved output y
 * (from_y: z = act^-1(y), act'(z) from y, x_hat = (z - bias) / gamma, with s = bias and
 * the division by gamma applied per channel by the caller) or from the saved input x
 * (z = (x - s) * za + zb recomputed bit for bit, x_hat from x - s): one pass for the two
 * reductions, one pass for dx, g' = g * act'(z) computed on the fly. */

/* y = act(z), as bnkit.kernels.activation.activate. */
INLINE T NAME(act_value)(T z, T p, const int act) {
    if (act == ACT_LEAKY) return z > (T)0 ? z : z * p;
    if (act == ACT_ELU) return z > (T)0 ? z : EXPM1(z) * p;
    return z;
}

/* g' = g * act'(z), and *v: z (from_y, recovered from y = src) or x (src). */
INLINE T NAME(act_grad)(T gv, T src, T sc, T ac, T bc, T p, const int act, const int from_y,
                        T *v) {
    *v = src;
    if (from_y) {
        if (act == ACT_LEAKY) {
            const int pos = src > (T)0;
            *v = pos ? src : src / p;
            return pos ? gv : gv * p;
        }
        if (act == ACT_ELU) {
            if (src > (T)0) return gv;
            const T slope = src + p; /* alpha * exp(z) = y + alpha */
            /* a saturated output (y = -alpha: z = -inf, slope 0) adds nothing, as in the
             * portable kernel; without this 0 * -inf would make the sums NaN */
            *v = slope == (T)0 ? (T)0 : LOG1P(src / p);
            return gv * slope;
        }
        return gv;
    }
    if (act == ACT_LEAKY) {
        T z = (src - sc) * ac + bc;
        return z > (T)0 ? gv : gv * p;
    }
    if (act == ACT_ELU) {
        T z = (src - sc) * ac + bc;
        if (z > (T)0) return gv;
        T y = EXPM1(z) * p;
        return gv * (y + p);
    }
    return gv;
}

INLINE void NAME(act_forward_row)(const D *xp, D *yp, i64 n, i64 stride_c, const T *s,
                                  const T *a, const T *b, T p, const int act) {
    /* stride_c 0: one channel (s[0], a[0], b[0]); 1: channel i at position i. */
    if (stride_c) {
        MAP_ROW1(0, yp, n, i, xp, NAME(act_value)((LD(xp[i]) - s[i]) * a[i] + b[i], p, act));
    } else {
        const T sc = s[0], ac = a[0], bc = b[0];
        MAP_ROW1(0, yp, n, i, xp, NAME(act_value)((LD(xp[i]) - sc) * ac + bc, p, act));
    }
}

void NAME(bn_act_forward_ncl)(const D *x, D *y, i64 N, i64 C, i64 L, const T *s, const T *a,
                              const T *b, int act, double param, int nt) {
    const T p = (T)param;
    _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
    for (i64 row = 0; row < N * C; ++row) {
        i64 c = row % C;
#define F_(A, Y) NAME(act_forward_row)(x + row * L, y + row * L, L, 0, s + c, a + c, b + c, p, A)
        ACT_SWITCH(act, 0, F_)
#undef F_
    }
}

void NAME(bn_act_forward_nc)(const D *x, D *y, i64 M, i64 C, const T *s, const T *a,
                             const T *b, int act, double param, int nt) {
    const T p = (T)param;
    _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
    for (i64 r = 0; r < M; ++r) {
#define F_(A, Y) NAME(act_forward_row)(x + r * C, y + r * C, C, 1, s, a, b, p, A)
        ACT_SWITCH(act, 0, F_)
#undef F_
    }
}

/* Reductions over one ncl row (one channel): sums of g' and g' (v - s) in double. */
INLINE void NAME(act_reduce_row)(const D *gp, const D *sp, i64 L, T sc, T ac, T bc, T p,
                                 const int act, const int from_y, double *ag, double *agc) {
    const double sd = (double)sc;
    double tg = 0.0, tgc = 0.0;
    _Pragma("omp simd reduction(+ : tg, tgc)")
    for (i64 i = 0; i < L; ++i) {
        T v;
        double gi = (double)NAME(act_grad)(LD(gp[i]), LD(sp[i]), sc, ac, bc, p, act, from_y, &v);
        tg += gi;
        tgc += gi * ((double)v - sd);
    }
    *ag += tg;
    *agc += tgc;
}

/* The same over one nc row (every channel), into per-channel block sums in T about
 * ref = s + m (see bn_backward_reduce_nc). */
INLINE void NAME(act_reduce_nc_row)(const D *gp, const D *sp, i64 C, const T *s,
                                    const T *ref, const T *za, const T *zb, T p,
                                    const int act, const int from_y, T *bg, T *bgc) {
    _Pragma("omp simd")
    for (i64 c = 0; c < C; ++c) {
        T v;
        const T gi = NAME(act_grad)(LD(gp[c]), LD(sp[c]), s[c], za[c], zb[c], p, act, from_y, &v);
        bg[c] += gi;
        bgc[c] += gi * (v - ref[c]);
    }
}

/* sum_g = sum g', sum_gc = sum g' (v - s) - m sum g' per channel (src: y or x, see above;
 * za and zb are read only without from_y but must be valid arrays). ncl layout. */
void NAME(bn_act_backward_reduce_ncl)(const D *g, const D *src, i64 N, i64 C, i64 L,
                                      const T *s, const T *m, const T *za, const T *zb,
                                      int act, double param, int from_y, double *sum_g,
                                      double *sum_gc, int nt) {
    const T p = (T)param;
    i64 R = N * C, P = nt < 1 ? 1 : nt;
    if (P > R) P = R;
    if (P < 1) P = 1;
    double *acc = (double *)calloc((size_t)(2 * C * P), sizeof(double));
    _Pragma("omp parallel for num_threads(nt) schedule(static, 1) if(nt > 1)")
    for (i64 part = 0; part < P; ++part) {
        double *ag = acc + 2 * C * part, *agc = ag + C;
        for (i64 row = R * part / P; row < R * (part + 1) / P; ++row) {
            i64 c = row % C;
#define F_(A, Y)                                                                         \
    NAME(act_reduce_row)(g + row * L, src + row * L, L, s[c], za[c], zb[c], p, A, Y,     \
                         ag + c, agc + c)
            ACT_SWITCH(act, from_y, F_)
#undef F_
        }
    }
    for (i64 c = 0; c < C; ++c) {
        double a = 0.0, b = 0.0;
        for (i64 part = 0; part < P; ++part) a += acc[2 * C * part + c],
                                             b += acc[2 * C * part + C + c];
        sum_g[c] = a;
        sum_gc[c] = b - (double)m[c] * a;
    }
    free(acc);
}

/* The same reductions, nc layout, in blocks of rows as bn_backward_reduce_nc. */
void NAME(bn_act_backward_reduce_nc)(const D *g, const D *src, i64 M, i64 C, const T *s,
                                     const T *m, const T *za, const T *zb, int act,
                                     double param, int from_y, double *sum_g, double *sum_gc,
                                     int nt) {
    const T p = (T)param;
    i64 P = M < nt ? (M > 0 ? M : 1) : nt;
    if (P < 1) P = 1;
    double *acc = (double *)calloc((size_t)(2 * C * P), sizeof(double));
    T *blk = (T *)malloc(sizeof(T) * (size_t)(2 * C * P + C));
    T *ref = blk + 2 * C * P;
    for (i64 c = 0; c < C; ++c) ref[c] = (T)((double)s[c] + (double)m[c]);
    _Pragma("omp parallel for num_threads(nt) schedule(static, 1) if(nt > 1)")
    for (i64 part = 0; part < P; ++part) {
        double *ag = acc + 2 * C * part, *agc = ag + C;
        T *bg = blk + 2 * C * part, *bgc = bg + C;
        const i64 r_end = M * (part + 1) / P;
        for (i64 r0 = M * part / P; r0 < r_end; r0 += NC_SUM_ROWS) {
            const i64 r1 = min64(r_end, r0 + NC_SUM_ROWS);
            for (i64 c = 0; c < C; ++c) bg[c] = (T)0, bgc[c] = (T)0;
            for (i64 r = r0; r < r1; ++r) {
#define F_(A, Y) \
    NAME(act_reduce_nc_row)(g + r * C, src + r * C, C, s, ref, za, zb, p, A, Y, bg, bgc)
                ACT_SWITCH(act, from_y, F_)
#undef F_
            }
            _Pragma("omp simd")
            for (i64 c = 0; c < C; ++c) ag[c] += (double)bg[c], agc[c] += (double)bgc[c];
        }
    }
    for (i64 c = 0; c < C; ++c) {
        double a = 0.0, b = 0.0;
        for (i64 part = 0; part < P; ++part) a += acc[2 * C * part + c],
                                             b += acc[2 * C * part + C + c];
        sum_g[c] = a;
        sum_gc[c] = b + (((double)ref[c] - (double)s[c]) - (double)m[c]) * a;
    }
    free(blk);
    free(acc);
}

/* dx = g' * alpha + (v - s) * k1 + k0 over one row; stride_c as in act_forward_row. */
INLINE void NAME(act_input_row)(const D *gp, const D *sp, D *dp, i64 n, i64 stride_c,
                                const T *s, const T *alpha, const T *k1, const T *k0,
                                const T *za, const T *zb, T p, const int act,
                                const int from_y) {
    if (stride_c) {
        MAP_ROW2(0, dp, n, i, gp, sp, ({
                     T v;
                     T gi = NAME(act_grad)(LD(gp[i]), LD(sp[i]), s[i], za[i], zb[i], p, act,
                                           from_y, &v);
                     gi * alpha[i] + ((v - s[i]) * k1[i] + k0[i]);
                 }));
    } else {
        const T sc = s[0], ac = alpha[0], k1c = k1[0], k0c = k0[0], ta = za[0], tb = zb[0];
        MAP_ROW2(0, dp, n, i, gp, sp, ({
                     T v;
                     T gi = NAME(act_grad)(LD(gp[i]), LD(sp[i]), sc, ta, tb, p, act, from_y, &v);
                     gi * ac + ((v - sc) * k1c + k0c);
                 }));
    }
}

void NAME(bn_act_backward_input_ncl)(const D *g, const D *src, D *dx, i64 N, i64 C, i64 L,
                                     const T *s, const T *alpha, const T *k1, const T *k0,
                                     const T *za, const T *zb, int act, double param,
                                     int from_y, int nt) {
    const T p = (T)param;
    _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
    for (i64 row = 0; row < N * C; ++row) {
        i64 c = row % C;
#define F_(A, Y)                                                                         \
    NAME(act_input_row)(g + row * L, src + row * L, dx + row * L, L, 0, s + c, alpha + c, \
                        k1 + c, k0 + c, za + c, zb + c, p, A, Y)
        ACT_SWITCH(act, from_y, F_)
#undef F_
    }
}

void NAME(bn_act_backward_input_nc)(const D *g, const D *src, D *dx, i64 M, i64 C,
                                    const T *s, const T *alpha, const T *k1, const T *k0,
                                    const T *za, const T *zb, int act, double param,
                                    int from_y, int nt) {
    const T p = (T)param;
    _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
    for (i64 r = 0; r < M; ++r) {
#define F_(A, Y)                                                                          \
    NAME(act_input_row)(g + r * C, src + r * C, dx + r * C, C, 1, s, alpha, k1, k0, za, zb, \
                        p, A, Y)
        ACT_SWITCH(act, from_y, F_)
#undef F_
    }
}


/* The layer in one call each way (the express path: no Python between the steps), with
 * a fused activation `act` (ACT_IDENTITY: none, ACT_RELU, ACT_LEAKY or ACT_ELU with its
 * parameter) and, in training, an optional mask (kind 0: (N, L), 1: (R,) bytes, nonzero
 * at valid positions; with ACT_IDENTITY only), whose valid positions alone make the
 * statistics. Layout: kind 0 = ncl (R = N rows of C * L), 1 = nc (R rows of C). `saved`
 * holds 5 * C values: shift, shifted mean, invstd (what the backward pass needs), then
 * the affine coefficients a and b' of z = (x - shift) * a + b' (NULL: a scratch buffer).
 *
 * Forward, training: batch statistics, the running statistics updated as
 * bn_update_running does (when given), invstd = 1 / sqrt(var + eps), a = invstd * w,
 * b' = bias - smean * a, each rounded in T as the portable path rounds them.
 * Forward, eval: shift = running mean, smean = 0, var = running var.
 * Returns whether the batch was recorded in the running statistics (1 when nothing was
 * to record). */
int NAME(bn_forward)(int kind, const D *x, const uint8_t *mask, D *y, i64 R, i64 C, i64 L,
                     const T *w,
                     const T *bias, double eps, int training, T *saved, T *rmean, T *rvar,
                     double momentum, int64_t *tracked, int unbiased, int skip_nonfinite,
                     int act, double param, int nt) {
    T *scratch = saved ? NULL : (T *)malloc((size_t)(5 * C) * sizeof(T));
    if (!saved) saved = scratch; /* no backward pass to save for */
    T *shift = saved, *smean = saved + C, *invstd = saved + 2 * C;
    T *a = saved + 3 * C, *b = saved + 4 * C;
    const T e = (T)eps;
    int recorded = 1;
    if (training) {
        T *var = invstd; /* the variance, until it becomes invstd below */
        double count = (double)(R * L);
        if (mask && kind == 0)
            NAME(bn_stats_masked_ncl)(x, mask, R, C, L, shift, smean, var, &count, nt);
        else if (mask)
            NAME(bn_stats_masked_nc)(x, mask, R, C, shift, smean, var, &count, nt);
        else if (kind == 0)
            NAME(bn_stats_ncl)(x, R, C, L, shift, smean, var, nt);
        else
            NAME(bn_stats_nc)(x, R, C, shift, smean, var, nt);
        if (rmean || rvar || tracked)
            recorded = CAT(bn_update_running, CS)(shift, smean, var, C, count, rmean,
                                               rvar, sizeof(T) == sizeof(double), momentum,
                                               tracked, unbiased, skip_nonfinite);
        for (i64 c = 0; c < C; ++c) invstd[c] = (T)1 / SQRT(var[c] + e);
    } else {
        for (i64 c = 0; c < C; ++c) {
            shift[c] = rmean[c];
            smean[c] = (T)0;
            invstd[c] = (T)1 / SQRT(rvar[c] + e);
        }
    }
    for (i64 c = 0; c < C; ++c) {
        a[c] = w ? invstd[c] * w[c] : invstd[c];
        T beta = -smean[c] * a[c];
        b[c] = bias ? beta + bias[c] : beta;
    }
    if (act == ACT_LEAKY || act == ACT_ELU) {
        if (kind == 0)
            NAME(bn_act_forward_ncl)(x, y, R, C, L, shift, a, b, act, param, nt);
        else
            NAME(bn_act_forward_nc)(x, y, R, C, shift, a, b, act, param, nt);
    } else if (kind == 0) {
        NAME(bn_affine_ncl)(x, y, R, C, L, shift, a, b, act == ACT_RELU, nt);
    } else {
        NAME(bn_affine_nc)(x, y, R, C, shift, a, b, act == ACT_RELU, nt);
    }
    free(scratch);
    return recorded;
}

/* Backward of bn_forward from its `saved` values: dw = sum(g' x_hat), db = sum(g') (when
 * not NULL) and dx (when not NULL), g' = g * act'(z). `src` is the input x, or with
 * from_y the output y (an invertible activation: z = act^-1(y), x_hat = (z - bias) / w,
 * which the caller has checked is exact). g and dx may be the same array: every pass
 * reads g at a position before it writes dx there. With batch statistics (training)
 * dx = a * (g' - mean(g') - x_hat * mean(g' x_hat)); without, dx = a * g'. The
 * coefficients are computed in double and rounded once. */
void NAME(bn_backward)(int kind, const D *g, const D *src, const uint8_t *mask, D *dx, i64 R,
                       i64 C, i64 L, const T *saved, const T *w, const T *bias, T *dw, T *db,
                       int training, int act, double param, int from_y, int nt) {
    const T *invstd = saved + 2 * C, *za = saved + 3 * C, *zb = saved + 4 * C;
    const int fused = from_y || act == ACT_LEAKY || act == ACT_ELU;
    double *sums = (double *)malloc((size_t)(2 * C) * sizeof(double));
    T *coef = (T *)malloc((size_t)(5 * C) * sizeof(T));
    double *sum_g = sums, *sum_gc = sums + C;
    T *alpha = coef, *k1 = coef + C, *k0 = coef + 2 * C;
    /* v - s with v = x: s = shift, centred on the shifted mean m; v = z: s = bias, m = 0 */
    const T *s = saved, *m = saved + C;
    if (from_y) {
        T *centre = coef + 3 * C, *zero = coef + 4 * C;
        for (i64 c = 0; c < C; ++c) centre[c] = bias ? bias[c] : (T)0, zero[c] = (T)0;
        s = centre;
        m = zero;
    }
    if (fused && kind == 0)
        NAME(bn_act_backward_reduce_ncl)(g, src, R, C, L, s, m, za, zb, act, param, from_y,
                                         sum_g, sum_gc, nt);
    else if (fused)
        NAME(bn_act_backward_reduce_nc)(g, src, R, C, s, m, za, zb, act, param, from_y, sum_g,
                                        sum_gc, nt);
    else if (kind == 0)
        NAME(bn_backward_reduce_ncl)(g, src, R, C, L, s, m, act == ACT_RELU ? za : NULL,
                                     act == ACT_RELU ? zb : NULL, sum_g, sum_gc, nt);
    else
        NAME(bn_backward_reduce_nc)(g, src, R, C, s, m, act == ACT_RELU ? za : NULL,
                                    act == ACT_RELU ? zb : NULL, sum_g, sum_gc, nt);
    /* the sums run over every position (a padded output depends on the statistics too);
     * the path through them reaches the valid inputs only, count of them */
    const double count = (double)(mask ? bn_valid_count(mask, kind == 0 ? R * L : R) : R * L);
    for (i64 c = 0; c < C; ++c) {
        const double is = (double)invstd[c], wc = w ? (double)w[c] : 1.0;
        /* x_hat = (v - s - m) * per_unit */
        const double per_unit = from_y ? 1.0 / wc : is;
        const double sum_g_x_hat = sum_gc[c] * per_unit;
        if (dw) dw[c] = (T)sum_g_x_hat;
        if (db) db[c] = (T)sum_g[c];
        const double ac = is * wc;
        alpha[c] = (T)ac;
        if (training) {
            const double slope = -ac * sum_g_x_hat / count; /* coefficient of x_hat */
            k1[c] = (T)(slope * per_unit);
            k0[c] = (T)(-ac * sum_g[c] / count - (double)m[c] * slope * per_unit);
        } else {
            k1[c] = (T)0;
            k0[c] = (T)0;
        }
    }
    if (dx && mask && kind == 0)
        NAME(bn_backward_input_masked_ncl)(g, src, mask, dx, R, C, L, s, alpha, k1, k0, nt);
    else if (dx && mask)
        NAME(bn_backward_input_masked_nc)(g, src, mask, dx, R, C, s, alpha, k1, k0, nt);
    else if (dx && fused && kind == 0)
        NAME(bn_act_backward_input_ncl)(g, src, dx, R, C, L, s, alpha, k1, k0, za, zb, act,
                                        param, from_y, nt);
    else if (dx && fused)
        NAME(bn_act_backward_input_nc)(g, src, dx, R, C, s, alpha, k1, k0, za, zb, act, param,
                                       from_y, nt);
    else if (dx && kind == 0)
        NAME(bn_backward_input_ncl)(g, src, dx, R, C, L, s, alpha, k1, k0,
                                    act == ACT_RELU ? za : NULL, act == ACT_RELU ? zb : NULL, nt);
    else if (dx)
        NAME(bn_backward_input_nc)(g, src, dx, R, C, s, alpha, k1, k0,
                                   act == ACT_RELU ? za : NULL, act == ACT_RELU ? zb : NULL, nt);
    free(coef);
    free(sums);
}

#endif
