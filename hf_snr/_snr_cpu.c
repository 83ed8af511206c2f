/* Fused CPU kernel for one SNRAdamW step over a list of tensors (see hf_snr/fused_cpu.py).
 *
 * Built at first use by fused_cpu.py with the system C compiler:
 *     gcc -O3 -march=native -fopenmp -fno-math-errno -ffp-contract=off -shared -fPIC
 * No -ffast-math: every operation is an IEEE fp32 operation in the order torch's CPU kernels use,
 * so the results match the torch implementation up to rounding (mostly bit for bit):
 *   - lerp_(g, w) is fma(w, g - m, m) for |w| < 0.5, fma(w - 1, g - m, g) otherwise (ATen's lerp_vec),
 *   - x.mul_(a).addcmul_(y, y, value=b) is fma(b * y, y, x * a) (ATen's addcmul, as compiled),
 *   - x.add_(y, alpha=a) is fma(a, y, x),
 *   - p.addcdiv_(t1, t2, value=-lr) is p + (-lr * t1) / t2 (not fused),
 *   - x / scalar is a true division (ATen does not use the reciprocal for fp32),
 *   - sqrt is IEEE (correctly rounded). torch's CPU sqrt_ goes through MKL's VML, which is off by
 *     one ulp on ~20% of elements, so p agrees with a torch oracle within a few ulps rather than
 *     bit for bit (with an IEEE sqrt in the oracle: bit for bit); m, v, s agree bit for bit.
 * -ffp-contract=off keeps the compiler from fusing anything else.
 *
 * Work layout: the tensors of one call form one flat index space of N elements, cut into nparts
 * equal contiguous ranges (nparts = the requested thread count, fewer for small N). Each range is
 * walked in blocks of at most BLK elements that never cross a tensor or row boundary; a block runs
 * a few short vectorizable loops over L1-resident scratch buffers. Sums (statistics, row sums) are
 * accumulated in double, per range, in 16 fixed lanes (counts in integers), and the ranges'
 * partials are combined in range order after the parallel region: the result depends on nparts
 * (the thread count and N) only, not on scheduling. The elementwise results depend on nothing.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define SNR_ABI 4
#ifndef PAD
#define PAD 16
#endif
#ifndef BLK
#define BLK 128 /* elements per block: a block's data and scratch stay well inside L1 (measured: 128 is
                     1.25x faster than 512, 1.7x faster than 1024) */
#endif
#define LANES 16
#define MIN_PER_PART 32768 /* elements; smaller groups use fewer threads */
#define MAX_PARTS 256

enum { PASS_FULL = 0, PASS_MOMENTS = 1, PASS_UPDATE = 2 };
enum { MASK_SNR = 0, MASK_SOFT = 1, MASK_HARD = 2 };
enum { P_P = 0, P_M, P_V, P_S, P_P0, P_SQ, P_G, P_COUNT }; /* the order of the pointer arrays */

typedef struct {
    /* fp32 scalars: the caller rounds the Python doubles to fp32 as torch rounds a Python scalar */
    float beta1, beta2, rho;
    float omb1, omb2, omr;       /* 1 - beta1, 1 - beta2, 1 - rho (computed in double) */
    float lr, eps, decay_mul, lrwd; /* decay_mul = 1 - lr * wd, lrwd = lr * wd */
    float alpha, softness, c;
    float mb_a, mb_b;            /* microbatch variance: est = max(a * sq - b * g^2, 0) */
    int32_t pass, mask, signal, variance, decay, want_stats, rows, pad_;
    int32_t p_bf16, s_bf16, p0_bf16, nthreads;
    int64_t ntensors;
    void *const *ptrs;           /* P_COUNT arrays of ntensors pointers, back to back; NULL = absent */
    const int64_t *numel;        /* ntensors */
    const int64_t *row_len;      /* ntensors; used when rows != 0 (whole tensor: numel) */
    const int64_t *row_off;      /* ntensors: first row of each tensor in q_rows / row_sums */
    const int64_t *nrows;        /* ntensors: its number of rows */
    const float *tsc;            /* per-tensor scalars of tensor k at tsc[k * tsc_stride + 0..4]: bc1 = 1 - beta1^t,
                                    bc2 = 1 - beta2^t, bcr = 1 - rho^t, noise_scale, gate open (1) or not (0) */
    int64_t tsc_stride;          /* 5: one set per tensor; 0: one shared set */
    const float *q_rows;         /* PASS_UPDATE with rows: one gate per row */
    double *row_sums;            /* PASS_MOMENTS with rows: (rows, 2) sums of mu2 and sig2 */
    double *stats;               /* want_stats: 5 sums */
    /* nonfinite="skip" folded into the call: before anything is written, check these ncheck tensors
     * (fp32, or bf16 where check_bf16[k]) for inf / nan; *found = 1 (and nothing written) if any is */
    int64_t ncheck;
    const uint64_t *check_ptrs;
    const int64_t *check_numel;
    const int32_t *check_bf16;
    int32_t *found;
} snr_args;

/* ---- bf16 <-> fp32 (round to nearest even, NaN -> quiet NaN, as c10::BFloat16) ---- */
static inline float bf2f(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((f != f) ? 0x7fc0u : r);
}

static inline float fma_(float a, float b, float c)
{
#ifdef __FMA__
    return fmaf(a, b, c);
#else
    return (float)((double)a * (double)b + (double)c); /* exact product; the sum rounded twice, which
                                                           rarely differs from fmaf by an ulp */
#endif
}

static inline float lerp_(float start, float end, float w)
{
    /* ATen: |w| < 0.5 ? start + w * (end - start) : end - (end - start) * (1 - w), as fmas */
    return fabsf(w) < 0.5f ? fma_(w, end - start, start) : fma_(w - 1.0f, end - start, end);
}

static inline float clamp_min(float x, float lo) { return x < lo ? lo : x; } /* NaN stays NaN */
/* mu^2 and sigma^2 of a finite but huge gradient overflow to inf, and the gate's inf / (inf + inf) or
 * 0 * inf would be nan: both are clamped to fp32's largest value (an identity on finite values; NaN stays). */
static inline float finite_(float x) { return x > FLT_MAX ? FLT_MAX : x; }

/* ---- per-range accumulators ---- */
typedef struct {
    double st[3][LANES]; /* sums of q (seen), u * mu2, u * sig2 */
    int64_t cnt[2];       /* seen, seen and q > 0.5 */
    /* partial rows (a row cut by a range boundary): at most two per range */
    int64_t prow[2];
    double psum[2][2];
    int npart;
} part_acc;

/* Sums in double over LANES = 16 fixed lanes (element i of a block goes to lane i % 16), with GCC
 * vector extensions (plain scalar code where the target has no SIMD): no reassociation, so the
 * result is reproducible. nx sums at once, two 8-lane vectors each: 2 * nx independent chains hide
 * the latency of the additions (one chain per sum was 2.5 cycles an element). */
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) void lanes_acc(double *restrict acc, const float *const *x, const int nx,
                                                             int n)
{
    v8d a[5][2];
    for (int s = 0; s < nx; s++) memcpy(a[s], acc + s * LANES, sizeof a[s]);
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int s = 0; s < nx; s++) {
#ifdef __AVX512F__ /* one vcvtps2pd each (GCC 12 splits the generic conversion in four) */
            a[s][0] += (v8d)_mm512_cvtps_pd(_mm256_loadu_ps(x[s] + i));
            a[s][1] += (v8d)_mm512_cvtps_pd(_mm256_loadu_ps(x[s] + i + 8));
#else
            v8f lo, hi;
            memcpy(&lo, x[s] + i, sizeof lo);
            memcpy(&hi, x[s] + i + 8, sizeof hi);
            a[s][0] += __builtin_convertvector(lo, v8d);
            a[s][1] += __builtin_convertvector(hi, v8d);
#endif
        }
    for (int s = 0; s < nx; s++) memcpy(acc + s * LANES, a[s], sizeof a[s]);
    for (int j = 0; i < n; i++, j++)
        for (int s = 0; s < nx; s++) acc[s * LANES + j] += (double)x[s][i];
}

static inline double lanes_sum(const double *l)
{
    double h[8];
    for (int j = 0; j < 8; j++) h[j] = l[j] + l[j + 8];
    return ((h[0] + h[1]) + (h[2] + h[3])) + ((h[4] + h[5]) + (h[6] + h[7]));
}

/* One block of n <= BLK elements of tensor k starting at element off.
 * qrow: the row's gate (rows mode, PASS_UPDATE). rs: where to add the block's mu2/sig2 sums. */
static void run_block(const snr_args *A, int64_t k, int64_t off, int n, float qrow, double *rs, part_acc *acc)
{
    /* one scratch area, the buffers BLK + PAD floats apart (staggered modulo 4 KiB against "4K
     * aliasing" between them; no measurable effect at BLK = 128, kept as cheap insurance) */
    float scratch[7 * (BLK + PAD)] __attribute__((aligned(64)));
    float *const gbuf = scratch, *const sbuf = gbuf + BLK + PAD, *const mh = sbuf + BLK + PAD,
                *const mu2 = mh + BLK + PAD, *const sig2 = mu2 + BLK + PAD, *const q = sig2 + BLK + PAD,
                *const den = q + BLK + PAD;
    void *const *P = A->ptrs;
    const int64_t T = A->ntensors;
    float *restrict M = (float *)P[P_M * T + k] + off;
    float *restrict V = (float *)P[P_V * T + k] + off;
    const float *tsc = A->tsc + k * A->tsc_stride;
    const float bc1 = tsc[0], bc2 = tsc[1], bcr = tsc[2], ns = tsc[3];
    const int gate_open = tsc[4] != 0.0f;
    const int pass = A->pass;
    const int need_g = pass != PASS_UPDATE || A->signal == 1;
    const int elem_gate = !gate_open && !A->rows;
    const int need_musig = pass == PASS_MOMENTS ? rs != NULL : (A->want_stats || elem_gate);

    /* gradient as fp32 */
    const float *restrict G = NULL;
    if (need_g) {
        if (A->p_bf16) {
            const uint16_t *restrict Gh = (const uint16_t *)P[P_G * T + k] + off;
            for (int i = 0; i < n; i++) gbuf[i] = bf2f(Gh[i]);
            G = gbuf;
        } else {
            G = (const float *)P[P_G * T + k] + off;
        }
    }

    /* variance state (and, before the update, the moments) */
    const float *restrict S; /* fp32 values of the (new) variance state, as stored */
    if (pass != PASS_UPDATE) {
        const float rho = A->rho, omr = A->omr;
        float *restrict est = sig2; /* scratch: the per-element variance increment */
        if (A->variance == 0) {
            for (int i = 0; i < n; i++) {
                const float d = G[i] - M[i];
                est[i] = d;
            }
        } else {
            float *restrict SQ = (float *)P[P_SQ * T + k] + off;
            const float a = A->mb_a, b = A->mb_b;
            for (int i = 0; i < n; i++) { /* (sq * a - g * g * b).clamp_min_(0) */
                est[i] = clamp_min(SQ[i] * a - (G[i] * G[i]) * b, 0.0f);
                SQ[i] = 0.0f;
            }
        }
        if (A->s_bf16) {
            uint16_t *restrict Sh = (uint16_t *)P[P_S * T + k] + off;
            if (A->variance == 0)
                for (int i = 0; i < n; i++) {
                    const uint16_t h = f2bf(fma_(omr * est[i], est[i], bf2f(Sh[i]) * rho));
                    Sh[i] = h;
                    sbuf[i] = bf2f(h);
                }
            else
                for (int i = 0; i < n; i++) {
                    const uint16_t h = f2bf(fma_(omr, est[i], bf2f(Sh[i]) * rho));
                    Sh[i] = h;
                    sbuf[i] = bf2f(h);
                }
            S = sbuf;
        } else {
            float *restrict Sf = (float *)P[P_S * T + k] + off;
            if (A->variance == 0)
                for (int i = 0; i < n; i++) Sf[i] = fma_(omr * est[i], est[i], Sf[i] * rho);
            else
                for (int i = 0; i < n; i++) Sf[i] = fma_(omr, est[i], Sf[i] * rho);
            S = Sf;
        }
        const float omb1 = A->omb1, omb2 = A->omb2, beta2 = A->beta2;
        if (fabsf(omb1) < 0.5f)
            for (int i = 0; i < n; i++) {
                const float gi = G[i], mi = M[i];
                M[i] = fma_(omb1, gi - mi, mi);
                V[i] = fma_(omb2 * gi, gi, V[i] * beta2);
            }
        else
            for (int i = 0; i < n; i++) {
                const float gi = G[i];
                M[i] = lerp_(M[i], gi, omb1);
                V[i] = fma_(omb2 * gi, gi, V[i] * beta2);
            }
    } else if (A->s_bf16) {
        if (need_musig) { /* otherwise s is not read at all */
            const uint16_t *restrict Sh = (const uint16_t *)P[P_S * T + k] + off;
            for (int i = 0; i < n; i++) sbuf[i] = bf2f(Sh[i]);
        }
        S = sbuf;
    } else {
        S = (const float *)P[P_S * T + k] + off;
    }

    if (pass == PASS_MOMENTS && !rs) return;

    /* bias-corrected mean, signal and noise */
    for (int i = 0; i < n; i++) mh[i] = M[i] / bc1;
    if (need_musig) {
        if (A->signal == 0)
            for (int i = 0; i < n; i++) mu2[i] = finite_(mh[i] * mh[i]);
        else
            for (int i = 0; i < n; i++) mu2[i] = finite_(G[i] * G[i]);
        for (int i = 0; i < n; i++) sig2[i] = finite_((S[i] / bcr) * ns);
    }
    if (pass == PASS_MOMENTS) {
        if (rs) {
            const float *x[2] = {mu2, sig2};
            lanes_acc(rs, x, 2, n);
        }
        return;
    }

    /* the gate */
    if (gate_open) {
        for (int i = 0; i < n; i++) q[i] = 1.0f;
    } else if (A->rows) {
        for (int i = 0; i < n; i++) q[i] = qrow;
    } else if (A->mask == MASK_SNR) {
        const float c = A->c;
        for (int i = 0; i < n; i++) q[i] = mu2[i] / clamp_min(mu2[i] + c * sig2[i], FLT_MIN);
    } else if (A->mask == MASK_SOFT) {
        const float alpha = A->alpha, sf = A->softness;
        for (int i = 0; i < n; i++) {
            const float e = clamp_min(mu2[i] - alpha * sig2[i], 0.0f);
            q[i] = e / clamp_min(e + sf * sig2[i], FLT_MIN);
        }
    } else {
        const float alpha = A->alpha;
        for (int i = 0; i < n; i++) q[i] = mu2[i] > alpha * sig2[i] ? 1.0f : 0.0f;
    }

    /* the parameter update */
    {
        const float bc2f = bc2, eps = A->eps, nlr = -A->lr;
        for (int i = 0; i < n; i++) den[i] = sqrtf(V[i] / bc2f) + eps;
        float *restrict upd = mh; /* q * m_hat, in place */
        for (int i = 0; i < n; i++) upd[i] = q[i] * mh[i];
        if (A->decay == 0) {
            const float dm = A->decay_mul;
            if (A->p_bf16) {
                uint16_t *restrict Ph = (uint16_t *)P[P_P * T + k] + off;
                for (int i = 0; i < n; i++) Ph[i] = f2bf(bf2f(Ph[i]) * dm + (nlr * upd[i]) / den[i]);
            } else {
                float *restrict Pf = (float *)P[P_P * T + k] + off;
                for (int i = 0; i < n; i++) Pf[i] = Pf[i] * dm + (nlr * upd[i]) / den[i];
            }
        } else {
            const float w = A->lrwd;
            float *restrict p0 = gbuf; /* the anchor as fp32 (the gradient is no longer needed) */
            if (A->p0_bf16) {
                const uint16_t *restrict Ah = (const uint16_t *)P[P_P0 * T + k] + off;
                for (int i = 0; i < n; i++) p0[i] = bf2f(Ah[i]);
            } else {
                memcpy(p0, (const float *)P[P_P0 * T + k] + off, (size_t)n * sizeof(float));
            }
            if (A->p_bf16) {
                uint16_t *restrict Ph = (uint16_t *)P[P_P * T + k] + off;
                for (int i = 0; i < n; i++) {
                    const float pf = bf2f(Ph[i]);
                    Ph[i] = f2bf(fma_(w, p0[i] - pf, pf) + (nlr * upd[i]) / den[i]);
                }
            } else {
                float *restrict Pf = (float *)P[P_P * T + k] + off;
                for (int i = 0; i < n; i++) {
                    const float pf = Pf[i];
                    Pf[i] = fma_(w, p0[i] - pf, pf) + (nlr * upd[i]) / den[i];
                }
            }
        }
    }
    if (A->want_stats) { /* per-element terms (fp32), then their sums (double) */
        const float lr = A->lr;
        float *restrict u = den, *restrict t0 = gbuf;
        int seen = 0, active = 0; /* integer sums vectorize (float ones would need reassociation) */
        for (int i = 0; i < n; i++) {
            u[i] = (q[i] * lr) / den[i];
            t0[i] = V[i] > 0.0f ? q[i] : 0.0f;
            seen += V[i] > 0.0f;
            active += (V[i] > 0.0f) & (q[i] > 0.5f);
            mu2[i] = u[i] * mu2[i];
            sig2[i] = u[i] * sig2[i];
        }
        acc->cnt[0] += seen;
        acc->cnt[1] += active;
        const float *x[3] = {t0, mu2, sig2};
        lanes_acc(&acc->st[0][0], x, 3, n);
    }
}

/* The elements [lo, hi) of the flat index space (prefix: starts of the tensors). */
static void run_range(const snr_args *A, const int64_t *prefix, int64_t lo, int64_t hi, part_acc *acc)
{
    const int64_t T = A->ntensors;
    int64_t k = 0;
    while (k < T && prefix[k + 1] <= lo) k++;
    for (; k < T && prefix[k] < hi; k++) {
        const int64_t t0 = prefix[k];
        int64_t a = (lo > t0 ? lo : t0) - t0;
        const int64_t b = (hi < prefix[k + 1] ? hi : prefix[k + 1]) - t0;
        if (!A->rows || (A->pass != PASS_MOMENTS && A->tsc[k * A->tsc_stride + 4] != 0.0f)) { /* no rows needed */
            for (; a < b; a += BLK) {
                const int n = (int)(b - a < BLK ? b - a : BLK);
                run_block(A, k, a, n, 1.0f, NULL, acc);
            }
            continue;
        }
        const int64_t rl = A->row_len[k];
        while (a < b) {
            const int64_t r = a / rl, r_lo = r * rl, r_hi = r_lo + rl;
            const int64_t e = b < r_hi ? b : r_hi;
            const int64_t row = A->row_off[k] + r;
            if (A->pass == PASS_MOMENTS) {
                double l2[2 * LANES] = {0};
                for (int64_t x = a; x < e; x += BLK) {
                    const int n = (int)(e - x < BLK ? e - x : BLK);
                    run_block(A, k, x, n, 0.0f, l2, acc);
                }
                const double s2[2] = {lanes_sum(l2), lanes_sum(l2 + LANES)};
                if (a == r_lo && e == r_hi) {
                    A->row_sums[2 * row] = s2[0];
                    A->row_sums[2 * row + 1] = s2[1];
                } else { /* cut by a range boundary: combined after the parallel region */
                    acc->prow[acc->npart] = row;
                    acc->psum[acc->npart][0] = s2[0];
                    acc->psum[acc->npart][1] = s2[1];
                    acc->npart++;
                }
            } else {
                const float qr = A->q_rows[row];
                for (int64_t x = a; x < e; x += BLK) {
                    const int n = (int)(e - x < BLK ? e - x : BLK);
                    run_block(A, k, x, n, qr, NULL, acc);
                }
            }
            a = e;
        }
    }
}

/* ---- the non-finite check of nonfinite="skip" ----
 * One read of the gradients (an all-ones exponent is inf or nan in both formats). The elements of
 * the n tensors form one flat index space cut into ranges as in snr_run; each range is read from its
 * end back to its start in chunks of CHECK_CHUNK elements (each chunk forward, in two halves at once:
 * two streams read ~10 % faster than one), so the start of every range, which snr_run's pass then
 * reads first, is the part still in cache (measured: 1 MiB chunks read as fast as one forward sweep). */
#define CHECK_CHUNK 262144

static inline uint32_t scan_f32(const uint32_t *restrict x, int64_t n)
{
    const int64_t h = n / 2;
    const uint32_t *restrict y = x + h;
    uint32_t b0 = 0, b1 = 0;
    for (int64_t i = 0; i < h; i++) {
        b0 |= (x[i] & 0x7f800000u) == 0x7f800000u;
        b1 |= (y[i] & 0x7f800000u) == 0x7f800000u;
    }
    for (int64_t i = 2 * h; i < n; i++) b0 |= (x[i] & 0x7f800000u) == 0x7f800000u;
    return b0 | b1;
}

static inline uint32_t scan_bf16(const uint16_t *restrict x, int64_t n)
{
    const int64_t h = n / 2;
    const uint16_t *restrict y = x + h;
    uint32_t b0 = 0, b1 = 0;
    for (int64_t i = 0; i < h; i++) {
        b0 |= (x[i] & 0x7f80u) == 0x7f80u;
        b1 |= (y[i] & 0x7f80u) == 0x7f80u;
    }
    for (int64_t i = 2 * h; i < n; i++) b0 |= (x[i] & 0x7f80u) == 0x7f80u;
    return b0 | b1;
}

/* [lo, hi) of the flat index space, backwards by chunks; stops at the first bad chunk */
static int check_range(const uint64_t *ptrs, const int32_t *is_bf16, const int64_t *prefix, int64_t n, int64_t lo,
                       int64_t hi)
{
    int64_t k = n - 1;
    while (k > 0 && prefix[k] >= hi) k--;
    for (; k >= 0 && prefix[k + 1] > lo; k--) {
        const int64_t t0 = prefix[k];
        const int64_t a = (lo > t0 ? lo : t0) - t0, b = (hi < prefix[k + 1] ? hi : prefix[k + 1]) - t0;
        for (int64_t e = b; e > a; e -= CHECK_CHUNK) {
            const int64_t s = e - CHECK_CHUNK > a ? e - CHECK_CHUNK : a;
            const uint32_t bad = is_bf16[k] ? scan_bf16((const uint16_t *)(uintptr_t)ptrs[k] + s, e - s)
                                            : scan_f32((const uint32_t *)(uintptr_t)ptrs[k] + s, e - s);
            if (bad) return 1;
        }
    }
    return 0;
}

/* 1 if any element of the n tensors (fp32, or bf16 where is_bf16[k]) is inf or nan, else 0
 * (negative: out of memory). The same cut into ranges as snr_run's for the same tensors. */
int snr_nonfinite(int64_t n, const uint64_t *ptrs, const int64_t *numels, const int32_t *is_bf16, int nthreads)
{
    if (n <= 0) return 0;
    int64_t *prefix = (int64_t *)malloc((size_t)(n + 1) * sizeof(int64_t));
    if (!prefix) return -1;
    prefix[0] = 0;
    for (int64_t k = 0; k < n; k++) prefix[k + 1] = prefix[k] + numels[k];
    const int64_t N = prefix[n];
    int64_t nparts = nthreads < 1 ? 1 : nthreads;
    if (nparts > MAX_PARTS) nparts = MAX_PARTS;
    if (nparts > 1 && N / nparts < MIN_PER_PART) nparts = N / MIN_PER_PART > 1 ? N / MIN_PER_PART : 1;
    int bad = 0;
    if (nparts == 1) {
        bad = check_range(ptrs, is_bf16, prefix, n, 0, N);
    } else {
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)nparts) reduction(| : bad) schedule(static, 1)
#endif
        for (int64_t t = 0; t < nparts; t++)
            bad |= check_range(ptrs, is_bf16, prefix, n, N / nparts * t + (N % nparts) * t / nparts,
                               N / nparts * (t + 1) + (N % nparts) * (t + 1) / nparts);
    }
    free(prefix);
    return bad;
}

int snr_abi(void) { return SNR_ABI; }

int snr_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Returns 0 on success, a negative code on bad arguments (the Python side checks them first). */
int snr_run(const snr_args *A)
{
    const int64_t T = A->ntensors;
    if (T < 0 || A->pass < 0 || A->pass > 2) return -1;
    if (A->pass == PASS_MOMENTS && A->rows && !A->row_sums) return -2;
    if (A->pass == PASS_UPDATE && A->rows && !A->q_rows) return -3;
    if (A->pass == PASS_FULL && A->rows) return -4;
    if (A->ncheck > 0) {
        if (!A->found) return -6;
        const int bad = snr_nonfinite(A->ncheck, A->check_ptrs, A->check_numel, A->check_bf16, A->nthreads);
        if (bad < 0) return -5;
        *A->found = bad;
        if (bad) return 0; /* nothing written */
    }
    int64_t *prefix = (int64_t *)malloc((size_t)(T + 1) * sizeof(int64_t));
    if (!prefix) return -5;
    prefix[0] = 0;
    for (int64_t k = 0; k < T; k++) prefix[k + 1] = prefix[k] + A->numel[k];
    const int64_t N = prefix[T];

    /* rows of empty tensors get zero sums (no block ever touches them) */
    if (A->pass == PASS_MOMENTS && A->rows)
        for (int64_t k = 0; k < T; k++)
            if (A->numel[k] == 0)
                for (int64_t r = A->row_off[k]; r < A->row_off[k] + A->nrows[k]; r++)
                    A->row_sums[2 * r] = A->row_sums[2 * r + 1] = 0.0;

    int64_t nparts = A->nthreads < 1 ? 1 : A->nthreads;
    if (nparts > MAX_PARTS) nparts = MAX_PARTS;
    if (nparts > 1 && N / nparts < MIN_PER_PART) nparts = N / MIN_PER_PART > 1 ? N / MIN_PER_PART : 1;
    part_acc *acc = (part_acc *)calloc((size_t)nparts, sizeof(part_acc));
    if (!acc) {
        free(prefix);
        return -5;
    }
    if (nparts == 1) {
        run_range(A, prefix, 0, N, &acc[0]);
    } else {
#ifdef _OPENMP
#pragma omp parallel num_threads((int)nparts)
        {
            const int64_t nth = omp_get_num_threads();
            for (int64_t t = omp_get_thread_num(); t < nparts; t += nth) {
                part_acc local; /* on this thread's stack: no false sharing of acc[] */
                memset(&local, 0, sizeof local);
                run_range(A, prefix, N / nparts * t + (N % nparts) * t / nparts,
                          N / nparts * (t + 1) + (N % nparts) * (t + 1) / nparts, &local);
                acc[t] = local;
            }
        }
#else
        for (int64_t t = 0; t < nparts; t++)
            run_range(A, prefix, N / nparts * t + (N % nparts) * t / nparts,
                      N / nparts * (t + 1) + (N % nparts) * (t + 1) / nparts, &acc[t]);
#endif
    }

    /* combine, in range order */
    if (A->pass == PASS_MOMENTS && A->rows) {
        for (int64_t t = 0; t < nparts; t++)
            for (int j = 0; j < acc[t].npart; j++) A->row_sums[2 * acc[t].prow[j]] = A->row_sums[2 * acc[t].prow[j] + 1] = 0.0;
        for (int64_t t = 0; t < nparts; t++)
            for (int j = 0; j < acc[t].npart; j++) {
                A->row_sums[2 * acc[t].prow[j]] += acc[t].psum[j][0];
                A->row_sums[2 * acc[t].prow[j] + 1] += acc[t].psum[j][1];
            }
    }
    if (A->want_stats && A->pass != PASS_MOMENTS) {
        double tot[5] = {0, 0, 0, 0, 0};
        for (int64_t t = 0; t < nparts; t++)
        {
            tot[0] += lanes_sum(acc[t].st[0]);
            tot[1] += (double)acc[t].cnt[0];
            tot[2] += (double)acc[t].cnt[1];
            tot[3] += lanes_sum(acc[t].st[1]);
            tot[4] += lanes_sum(acc[t].st[2]);
        }
        tot[4] *= (double)A->alpha;
        for (int s = 0; s < 5; s++) A->stats[s] = tot[s];
    }
    free(acc);
    free(prefix);
    return 0;
}

