"""Fused CPU merge kernels: one pass over the resident weights per candidate.

The merge methods in `evomerge.methods` are defined by their torch implementation (one tensor
operation after another). On CPU that walks every full-size temporary through main memory ten to
forty times per candidate; these kernels walk the resident weights once, computing the same
float32 operations in the same order on 512-entry blocks that stay in L1 cache, so the results
are bit for bit those of the torch code (the tests check it) at close to the machine's memory
bandwidth.

The C source, `kernels.c` in this package (shipped as package data), is compiled on first use
with the system C compiler (`cc`, or `$CC`) into `$EVOMERGE_CACHE_DIR/kernels/` (default
~/.cache/evomerge/kernels/), keyed by the source, the flags, the compiler and the CPU, and loaded
with ctypes, which releases the GIL, so a tensor is split over `torch.get_num_threads()` Python
threads. Flags keep IEEE semantics: no fast-math and no contraction of a multiply and an add into
an FMA. The sizes the C code and the Python side must agree on, the block of the deterministic L1
sum (`sparsify.L1_BLOCK`, also the grid of the thread split) and MAX_MODELS, are defined once in
Python and reach the compiler as -D flags. Without a compiler, or with `EVOMERGE_KERNELS=0`,
`available()` is False and the torch code runs instead (it also runs for tensors not on the CPU,
not contiguous or of another dtype).
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch

from evomerge.sparsify import L1_BLOCK

log = logging.getLogger(__name__)

MAX_MODELS = 16  # task vectors one em_merge call takes (the C side sizes its buffers by it)
MIN_PARALLEL = 1 << 17  # tensors smaller than this run on the calling thread
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

KIND_DENSE, KIND_RANGE, KIND_RANDOM = 0, 1, 2

_FLAGS = ["-O3", "-march=native", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
          "-fno-strict-aliasing", "-fno-math-errno", "-fno-trapping-math",
          f"-DEM_MAX_MODELS={MAX_MODELS}", f"-DEM_L1_BLOCK={L1_BLOCK}"]


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


def _source() -> str:
    """The C source, read from the installed package (a plain directory or an archive alike)."""
    return resources.files("evomerge").joinpath("kernels.c").read_text(encoding="utf-8")


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
    source = _source()
    key = hashlib.sha256("\0".join([source, " ".join(_FLAGS), cc, version, platform.machine(),
                                    _cpu_id()]).encode()).hexdigest()[:20]
    lib_path = _cache_dir() / f"merge-{key}.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            src, tmp_lib = Path(tmp) / "merge.c", Path(tmp) / "merge.so"
            src.write_text(source)
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
    for name in ("em_nth_eq", "em_nth_eq_rev"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int64]
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


def l1_partials_many(models: Sequence[ModelSpec], dtype: int, numel: int) -> list[list[float]]:
    """Per-L1_BLOCK sums of |delta * keep| (see em_l1), in block order, of several models over
    one tensor's entries, in one parallel pass."""
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
