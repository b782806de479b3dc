"""Fused CPU merge kernels: one pass over the resident weights per candidate.

The merge methods in `evomerge.methods` are defined by their torch implementation (one tensor
operation after another). On CPU that walks every full-size temporary through main memory ten to
forty times per candidate; these kernels walk the resident weights once, computing the same
float32 operations in the same order on 512-entry blocks that stay in L1 cache, so the results
are bit for bit those of the torch code (the tests check it) at close to the machine's memory
bandwidth.

The C source below is compiled on first use with the system C compiler (`cc`, or `$CC`) into
`$EVOMERGE_CACHE_DIR/kernels/` (default ~/.cache/evomerge/kernels/), keyed by the source, the
compiler and the CPU, and loaded with ctypes, which releases the GIL, so a tensor is split over
`torch.get_num_threads()` Python threads. Flags keep IEEE semantics: no fast-math and no
contraction of a multiply and an add into an FMA. Without a compiler, or with
`EVOMERGE_KERNELS=0`, `available()` is False and the torch code runs instead (it also runs for
tensors not on the CPU, not contiguous or of another dtype).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

L1_BLOCK = 1 << 16  # deterministic-sum grid: partial sums per block of this many entries
MAX_MODELS = 16
MIN_PARALLEL = 1 << 17  # tensors smaller than this run on the calling thread
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

KIND_DENSE, KIND_RANGE, KIND_RANDOM = 0, 1, 2

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define SUB 512
#define MAXK 16
#define L1_BLOCK 65536

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

/* Number of entries of [start, end) with |delta| == v. */
int64_t em_count_eq(const void *delta, int dt, int64_t start, int64_t end, float v) {
    float dbuf[SUB];
    int64_t count = 0;
    for (int64_t i0 = start; i0 < end; i0 += SUB) {
        const int n = (int)((end - i0) < SUB ? (end - i0) : SUB);
        const float *d = load(delta, dt, i0, n, dbuf);
        int c = 0;
        for (int j = 0; j < n; j++) c += fabsf(d[j]) == v;
        count += c;
    }
    return count;
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
"""

_FLAGS = ["-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
          "-fno-strict-aliasing", "-fno-math-errno", "-fno-trapping-math"]


class ModelSpec(ctypes.Structure):
    _fields_ = [("delta", ctypes.c_void_p), ("w", ctypes.c_float), ("scale", ctypes.c_float),
                ("lo_v", ctypes.c_float), ("hi_v", ctypes.c_float), ("lo_cut", ctypes.c_int64),
                ("hi_cut", ctypes.c_int64), ("kind", ctypes.c_int32), ("has_scale", ctypes.c_int32),
                ("has_lo", ctypes.c_int32), ("has_hi", ctypes.c_int32), ("k0", ctypes.c_uint32),
                ("k1", ctypes.c_uint32), ("thr", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class JobSpec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("out", ctypes.c_void_p), ("dt_in", ctypes.c_int32),
                ("dt_out", ctypes.c_int32), ("n_models", ctypes.c_int32), ("consensus", ctypes.c_int32),
                ("normalize", ctypes.c_int32), ("has_div", ctypes.c_int32), ("has_lam", ctypes.c_int32),
                ("full", ctypes.c_int32), ("skip_zero", ctypes.c_int32), ("first_init", ctypes.c_int32),
                ("src", ctypes.c_int32), ("fma", ctypes.c_int32), ("div", ctypes.c_float), ("lam", ctypes.c_float)]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_has_f16 = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE_DIR") or "~/.cache/evomerge").expanduser() / "kernels"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.info("evomerge kernels: no C compiler found; merging with torch operations")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([_SOURCE, " ".join(_FLAGS), cc, version, platform.machine(),
                                    _cpu_id()]).encode()).hexdigest()[:20]
    lib_path = _cache_dir() / f"merge-{key}.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            src, tmp_lib = Path(tmp) / "merge.c", Path(tmp) / "merge.so"
            src.write_text(_SOURCE)
            proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(tmp_lib), "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if proc.returncode:
                log.warning("evomerge kernels: %s failed (%s); merging with torch operations",
                            cc, proc.stderr.strip()[-500:])
                return None
            os.replace(tmp_lib, lib_path)  # atomic: concurrent workers may build the same file
    lib = ctypes.CDLL(str(lib_path))
    lib.em_abi.restype = ctypes.c_int
    if lib.em_abi() != ctypes.sizeof(ModelSpec) * 1000 + ctypes.sizeof(JobSpec):
        log.warning("evomerge kernels: structure layout mismatch; merging with torch operations")
        return None
    lib.em_has_f16.restype = ctypes.c_int
    lib.em_merge.argtypes = [ctypes.POINTER(JobSpec), ctypes.POINTER(ModelSpec), ctypes.c_int64, ctypes.c_int64]
    lib.em_merge.restype = None
    lib.em_l1.argtypes = [ctypes.POINTER(ModelSpec), ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                          ctypes.POINTER(ctypes.c_double)]
    lib.em_l1.restype = None
    for name in ("em_count_eq", "em_nth_eq", "em_nth_eq_rev"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
    lib.em_count_eq.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
    for name in ("em_nth_eq", "em_nth_eq_rev"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_float, ctypes.c_int64]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None when disabled (EVOMERGE_KERNELS=0, read
    at that first call) or unavailable."""
    global _lib, _tried, _has_f16
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("EVOMERGE_KERNELS", "1").lower() in ("0", "false", "no", "off"):
                _lib = None
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # a broken toolchain must not break merging
                    log.warning("evomerge kernels unavailable (%s); merging with torch operations", exc)
                    _lib = None
            _has_f16 = bool(_lib is not None and _lib.em_has_f16())
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None


_CPU = torch.device("cpu")


def supports(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can take these tensors (CPU, contiguous, float32/bfloat16/float16)."""
    if library() is None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        dt = t.dtype
        if t.device != _CPU or dt not in DTYPES or not t.is_contiguous() or t.numel() >= 1 << 32:
            return False
        if (dt == torch.float16 and not _has_f16) or (grad and t.requires_grad):
            return False
    return True


def threads() -> int:
    return max(1, torch.get_num_threads())


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: start a new pool there if needed."""
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="evomerge-merge")
            _pool_size = n
        return _pool


def split(numel: int, parts: int | None = None) -> list[tuple[int, int]]:
    """[0, numel) cut into contiguous ranges on the L1_BLOCK grid, one per thread."""
    parts = threads() if parts is None else parts
    if numel < MIN_PARALLEL or parts <= 1:
        return [(0, numel)]
    blocks = -(-numel // L1_BLOCK)
    per = -(-blocks // parts)
    return [(i * per * L1_BLOCK, min(numel, (i + 1) * per * L1_BLOCK)) for i in range(parts) if i * per * L1_BLOCK < numel]


def run_ranges(fn: Callable[[int, int], object], ranges: Sequence[tuple[int, int]]) -> list:
    """fn(start, end) for each range, in parallel threads (the ctypes calls release the GIL)."""
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    pool = _executor(len(ranges))
    futures = [pool.submit(fn, a, b) for a, b in ranges[1:]]
    first = fn(*ranges[0])
    return [first, *(f.result() for f in futures)]


_UNPROBED = object()
_fused: object = _UNPROBED


def addcmul_fuses() -> bool | None:
    """Whether torch's CPU `acc.addcmul_(x, c)` (mergekit's linear accumulation) rounds once per
    term, as a fused multiply-add: True or False when its vectorized and scalar paths agree, None
    when they do not (then the kernels cannot follow it and linear merges with torch). Probed once."""
    global _fused
    if _fused is _UNPROBED:
        e = 2.0 ** -12  # (1 + e)^2 - 1 = 2e + e^2: exact in one rounding, 2e in two
        results = set()
        for n in (64, 3):  # a vectorized block, and a scalar tail
            acc = torch.full((n,), -1.0)
            acc.addcmul_(torch.full((n,), 1 + e), torch.tensor([1 + e]))
            results |= {v == 2 * e + e * e for v in acc.tolist()}
        _fused = results.pop() if len(results) == 1 else None
    return _fused  # type: ignore[return-value]


def dtype_code(t: torch.Tensor) -> int:
    return DTYPES[t.dtype]


def merge(job: JobSpec, models: Sequence[ModelSpec], numel: int, keepalive: Sequence[torch.Tensor]) -> None:
    """Run em_merge over [0, numel) in parallel; `keepalive` holds the tensors the pointers name."""
    lib = library()
    assert lib is not None
    arr = (ModelSpec * max(1, len(models)))(*models)
    run_ranges(lambda a, b: lib.em_merge(ctypes.byref(job), arr, a, b), split(numel))
    del keepalive


def l1_partials(model: ModelSpec, dtype: int, numel: int) -> list[float]:
    """Per-L1_BLOCK sums of |delta * keep| (see em_l1), in block order."""
    lib = library()
    assert lib is not None
    nblocks = -(-numel // L1_BLOCK)
    out = (ctypes.c_double * max(1, nblocks))()
    base = ctypes.addressof(out)
    size = ctypes.sizeof(ctypes.c_double)

    def part(a: int, b: int) -> None:
        ptr = ctypes.cast(base + (a // L1_BLOCK) * size, ctypes.POINTER(ctypes.c_double))
        lib.em_l1(ctypes.byref(model), dtype, a, b, ptr)

    run_ranges(part, split(numel))
    return list(out)[:nblocks]


def l1_partials_many(models: Sequence[ModelSpec], dtype: int, numel: int) -> list[list[float]]:
    """l1_partials of several models over one tensor's entries, in one parallel pass."""
    lib = library()
    assert lib is not None
    nblocks = -(-numel // L1_BLOCK)
    outs = [(ctypes.c_double * max(1, nblocks))() for _ in models]
    size = ctypes.sizeof(ctypes.c_double)

    def part(a: int, b: int) -> None:
        for model, out in zip(models, outs):
            ptr = ctypes.cast(ctypes.addressof(out) + (a // L1_BLOCK) * size, ctypes.POINTER(ctypes.c_double))
            lib.em_l1(ctypes.byref(model), dtype, a, b, ptr)

    run_ranges(part, split(numel))
    return [list(out)[:nblocks] for out in outs]


def nth_equal(delta: torch.Tensor, value: float, nth: int, count: int | None = None) -> int:
    """Flat index of the nth (0-based) entry with |delta| == value, or -1 when there are fewer.
    With `count` (how many there are), the scan starts from the nearer end: tied entries are spread
    over the tensor, so that reads about a quarter of it on average."""
    lib = library()
    assert lib is not None
    ptr, dt, numel = delta.data_ptr(), dtype_code(delta), delta.numel()
    if count is not None and 0 <= nth < count and nth >= count // 2:
        return int(lib.em_nth_eq_rev(ptr, dt, 0, numel, value, count - 1 - nth))
    return int(lib.em_nth_eq(ptr, dt, 0, numel, value, nth))
