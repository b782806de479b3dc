/* Fused CPU merge kernels of evomerge (see evomerge/kernels.py, which compiles and loads this
   file): the same float32 operations, in the same order, as the torch code of evomerge.methods and
   evomerge.sparsify, so both give the same bits. Build with IEEE semantics: no fast-math, no
   contraction of a multiply and an add into an FMA (-ffp-contract=off). */
#include <stdint.h>
#include <string.h>
#include <math.h>

/* Entries per inner block: one block of every working array stays in L1 cache. */
#define SUB 512

/* Both come from evomerge/kernels.py as -D flags (MAX_MODELS and sparsify.L1_BLOCK), so the
   Python side, the torch reference and this file cannot disagree. */
#if !defined(EM_MAX_MODELS) || !defined(EM_L1_BLOCK)
#error "compile with -DEM_MAX_MODELS=... -DEM_L1_BLOCK=... (see evomerge/kernels.py)"
#endif
#define MAXK EM_MAX_MODELS
#define L1_BLOCK EM_L1_BLOCK

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { K_DENSE = 0, K_RANGE = 1, K_RANDOM = 2 };

typedef struct {
    const void *delta;
    float w, scale, lo_v, hi_v;
    int64_t lo_cut, hi_cut;
    int32_t kind, has_scale, has_lo, has_hi;
    uint32_t k0, k1, thr, pad;
} model_t;

typedef struct {
    const void *base;
    void *out;
    int32_t dt_in, dt_out, n_models, consensus;
    int32_t normalize, has_div, has_lam, full;
    int32_t skip_zero, first_init, src, fma;
    float div, lam;
} job_t;

int em_abi(void) { return (int)(sizeof(model_t) * 1000 + sizeof(job_t)); }

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
#endif
int em_has_f16(void) {
#ifdef HAVE_F16
    return 1;
#else
    return 0;
#endif
}

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

static inline uint32_t draw(uint32_t k0, uint32_t k1, uint32_t i) { return mix32((i ^ k0) * (k1 | 1u)); }

static const float *load(const void *src, int dt, int64_t off, int n, float *buf) {
    if (dt == DT_F32) return (const float *)src + off;
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        uint32_t *d = (uint32_t *)buf;
        for (int j = 0; j < n; j++) d[j] = (uint32_t)s[j] << 16;
        return buf;
    }
#ifdef HAVE_F16
    const _Float16 *s = (const _Float16 *)src + off;
    for (int j = 0; j < n; j++) buf[j] = (float)s[j];
#endif
    return buf;
}

static void store(void *dst, int dt, int64_t off, const float *src, int n) {
    if (dt == DT_F32) { memcpy((float *)dst + off, src, (size_t)n * 4); return; }
    if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        const uint32_t *s = (const uint32_t *)src;
        for (int j = 0; j < n; j++) {
            uint32_t u = s[j];
            uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            d[j] = ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (uint16_t)0x7FC0u : (uint16_t)r;
        }
        return;
    }
#ifdef HAVE_F16
    _Float16 *d = (_Float16 *)dst + off;
    for (int j = 0; j < n; j++) d[j] = (_Float16)src[j];
#endif
}

static inline int clampi(int64_t v, int n) { return v < 0 ? 0 : (v > n ? n : (int)v); }

/* keep[j] in {0, 1} for entries [i0, i0 + n) of one model's task vector */
static void keep_mask(const model_t *m, const float *d, int64_t i0, int n, float *keep) {
    if (m->kind == K_RANGE) {
        const float lo = m->lo_v, hi = m->hi_v;
        const int has_lo = m->has_lo, has_hi = m->has_hi;
        const int lc = clampi(m->lo_cut - i0, n), hc = clampi(m->hi_cut - i0, n);
        if (has_lo && !has_hi && lc == n) {  /* TIES, no tie cut in this block */
            for (int j = 0; j < n; j++) keep[j] = (float)(fabsf(d[j]) >= lo);
            return;
        }
        if (has_lo && !has_hi && lc == 0) {
            for (int j = 0; j < n; j++) keep[j] = (float)(fabsf(d[j]) > lo);
            return;
        }
        for (int j = 0; j < n; j++) {
            float a = fabsf(d[j]);
            int ok_lo = (!has_lo) | (a > lo) | ((a == lo) & (j < lc));
            int ok_hi = (!has_hi) | (a < hi) | ((a == hi) & (j < hc));
            keep[j] = (float)(ok_lo & ok_hi);
        }
    } else {
        const uint32_t k0 = m->k0, k1 = m->k1, thr = m->thr, b = (uint32_t)i0;
        for (int j = 0; j < n; j++) keep[j] = (float)(draw(k0, k1, b + (uint32_t)j) < thr);
    }
}

/* t = ((delta * keep) [* scale]) * w, or delta * w for a dense model */
static void term(const model_t *m, const float *d, int64_t i0, int n, float *t) {
    const float w = m->w;
    if (m->kind == K_DENSE) {
        for (int j = 0; j < n; j++) t[j] = d[j] * w;
        return;
    }
    float keep[SUB];
    keep_mask(m, d, i0, n, keep);
    if (m->has_scale) {
        const float s = m->scale;
        for (int j = 0; j < n; j++) { float x = d[j] * keep[j]; x = x * s; t[j] = x * w; }
    } else {
        for (int j = 0; j < n; j++) { float x = d[j] * keep[j]; t[j] = x * w; }
    }
}

/* Task-arithmetic family (full == 0) and full-model methods (full == 1) on [start, end).
   Full-model methods read whole sources from the model pointers when src is set (else each
   source is rebuilt as base + delta), and accumulate with one rounding per term (fmaf, as
   torch's addcmul_ does on CPUs with FMA) when fma is set. */
void em_merge(const job_t *job, const model_t *models, int64_t start, int64_t end) {
    float t[MAXK][SUB];
    float dbuf[SUB], bbuf[SUB], acc[SUB], aux[SUB], th[SUB];
    const int K = job->n_models;
    for (int64_t i0 = start; i0 < end; i0 += SUB) {
        const int n = (int)((end - i0) < SUB ? (end - i0) : SUB);
        /* full-model methods on whole sources (src) do not read the base at all */
        const float *b = (job->full && job->src) ? bbuf : load(job->base, job->dt_in, i0, n, bbuf);
        if (job->full) {
            int first = 1;
            for (int k = 0; k < K; k++) {
                const float c = models[k].w;
                if (job->skip_zero && c == 0.0f) continue;
                const float *d = load(models[k].delta, job->dt_in, i0, n, dbuf);
                const float *s = d;
                if (!job->src) { for (int j = 0; j < n; j++) th[j] = b[j] + d[j]; s = th; }
                if (first && job->first_init) {
                    for (int j = 0; j < n; j++) acc[j] = s[j] * c;
                } else {
                    if (first) for (int j = 0; j < n; j++) acc[j] = 0.0f;
                    if (job->fma) for (int j = 0; j < n; j++) acc[j] = fmaf(s[j], c, acc[j]);
                    else for (int j = 0; j < n; j++) { float p = s[j] * c; acc[j] = acc[j] + p; }
                }
                first = 0;
            }
            if (first) for (int j = 0; j < n; j++) acc[j] = 0.0f;
            if (job->has_div) { const float dv = job->div; for (int j = 0; j < n; j++) acc[j] = acc[j] / dv; }
            store(job->out, job->dt_out, i0, acc, n);
            continue;
        }
        for (int k = 0; k < K; k++) {
            const float *d = load(models[k].delta, job->dt_in, i0, n, dbuf);
            term(&models[k], d, i0, n, t[k]);
        }
        if (!job->consensus) {
            for (int j = 0; j < n; j++) acc[j] = 0.0f;
            for (int k = 0; k < K; k++) for (int j = 0; j < n; j++) acc[j] = acc[j] + t[k][j];
            if (job->has_div) { const float dv = job->div; for (int j = 0; j < n; j++) acc[j] = acc[j] / dv; }
        } else {
            float *tot = th, *dv = aux;
            for (int j = 0; j < n; j++) { tot[j] = 0.0f; acc[j] = 0.0f; dv[j] = 0.0f; }
            for (int k = 0; k < K; k++) for (int j = 0; j < n; j++) tot[j] = tot[j] + t[k][j];
            for (int k = 0; k < K; k++) {
                const float w = models[k].w;
                const float *tk = t[k];
                for (int j = 0; j < n; j++) {
                    int pos = tot[j] >= 0.0f;
                    int ag = (pos & (tk[j] > 0.0f)) | ((!pos) & (tk[j] < 0.0f));
                    float x = tk[j] * (float)ag;
                    acc[j] = acc[j] + x;
                    dv[j] = dv[j] + w * (float)ag;
                }
            }
            if (job->normalize) {
                for (int j = 0; j < n; j++) { float q = dv[j] == 0.0f ? 1.0f : dv[j]; acc[j] = acc[j] / q; }
            }
        }
        if (job->has_lam) { const float lam = job->lam; for (int j = 0; j < n; j++) acc[j] = acc[j] * lam; }
        for (int j = 0; j < n; j++) acc[j] = acc[j] + b[j];
        store(job->out, job->dt_out, i0, acc, n);
    }
}

/* Sum of |delta * keep| per L1_BLOCK-entry block of [start, end) (start on the block grid):
   8 float64 lanes, lane l taking entries j = l (mod 8) of the block in order, combined as
   ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)). A dense model (kind 0) sums |delta|. (Drawing a random
   mask again in em_merge is cheaper than storing it here and reading it back.) */
void em_l1(const model_t *m, int dt, int64_t start, int64_t end, double *partials) {
    float dbuf[SUB], keep[SUB], v[SUB];
    for (int64_t b0 = start; b0 < end; b0 += L1_BLOCK) {
        const int64_t b1 = (end - b0) < L1_BLOCK ? end : b0 + L1_BLOCK;
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i0 = b0; i0 < b1; i0 += SUB) {
            const int n = (int)((b1 - i0) < SUB ? (b1 - i0) : SUB);
            const float *d = load(m->delta, dt, i0, n, dbuf);
            if (m->kind == K_DENSE) {
                for (int j = 0; j < n; j++) v[j] = fabsf(d[j]);
            } else {
                keep_mask(m, d, i0, n, keep);
                for (int j = 0; j < n; j++) v[j] = fabsf(d[j] * keep[j]);
            }
            int j = 0;
            for (; j + 8 <= n; j += 8)
                for (int l = 0; l < 8; l++) s[l] += (double)v[j + l];
            for (int l = 0; j < n; j++, l++) s[l] += (double)v[j];
        }
        partials[(b0 - start) / L1_BLOCK] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
}

/* Flat index of the nth (0-based) entry of [start, end) with |delta| == v, counted from the end,
   or -1. */
int64_t em_nth_eq_rev(const void *delta, int dt, int64_t start, int64_t end, float v, int64_t nth) {
    float dbuf[SUB];
    for (int64_t i1 = end; i1 > start; i1 -= SUB) {
        const int n = (int)((i1 - start) < SUB ? (i1 - start) : SUB);
        const int64_t i0 = i1 - n;
        const float *d = load(delta, dt, i0, n, dbuf);
        int c = 0;
        for (int j = 0; j < n; j++) c += fabsf(d[j]) == v;
        if (nth >= c) { nth -= c; continue; }
        for (int j = n - 1; j >= 0; j--)
            if (fabsf(d[j]) == v && nth-- == 0) return i0 + j;
    }
    return -1;
}

/* Flat index of the nth (0-based) entry of [start, end) with |delta| == v, or -1. */
int64_t em_nth_eq(const void *delta, int dt, int64_t start, int64_t end, float v, int64_t nth) {
    float dbuf[SUB];
    for (int64_t i0 = start; i0 < end; i0 += SUB) {
        const int n = (int)((end - i0) < SUB ? (end - i0) : SUB);
        const float *d = load(delta, dt, i0, n, dbuf);
        int c = 0;
        for (int j = 0; j < n; j++) c += fabsf(d[j]) == v;
        if (nth >= c) { nth -= c; continue; }
        for (int j = 0; j < n; j++)
            if (fabsf(d[j]) == v && nth-- == 0) return i0 + j;
    }
    return -1;
}
