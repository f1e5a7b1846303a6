"""The torch backend's gather-free CPU kernels (`cpu_kernels.cpp`), compiled on first use and loaded with ctypes.

Built once per kernel source, compiler and CPU into `$XDG_CACHE_HOME/lorahub_engine` (a few seconds; no torch
headers).
Without a C++ compiler, or with `LORAHUB_ENGINE_NATIVE=0`, `library()` is None and the backend keeps to torch ops.
The kernels take fp32 or fp64 contiguous CPU tensors; a call large enough to split runs on up to
`torch.get_num_threads()` threads of OpenMP's team (ctypes releases the GIL), each owning disjoint output rows or
columns, so results do not depend on the thread count. Built with `-fopenmp`, the library needs `libgomp.so.1`,
which torch's Linux wheels have loaded already: the kernels then fork onto the very threads torch's ops use (cheap
against a decode-sized call, see benchmarks/bench_native_threads.py; where torch brings another OpenMP runtime, the
kernels get a team of their own). A compiler without OpenMP builds a one-thread library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-std=c++20", "-ffp-contract=fast", "-shared", "-fPIC"]
OPTIONAL_FLAGS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])  # the first that builds
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
MIN_SPLIT = 1 << 15  # multiply-adds per thread from which a call is split across threads


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (disabled, or no compiler could build them: warned once)."""
    if os.environ.get("LORAHUB_ENGINE_NATIVE", "1") == "0":
        return None
    compiler = compiler_path()
    if compiler is None:
        warnings.warn("no C++ compiler found: grouped_lora's per-token CPU path uses torch ops (slower)", stacklevel=2)
        return None
    path = _cache_dir() / f"cpu_kernels-{_build_key(compiler)}.so"
    if not path.exists():
        try:
            _build(compiler, path)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            warnings.warn(f"building {SOURCE.name} failed, grouped_lora's per-token CPU path uses torch ops: {detail}",
                          stacklevel=2)
            return None
    return _declare(ctypes.CDLL(str(path)))


def compiler_path() -> str | None:
    """The C++ compiler the kernels are built with: $CXX, else the first of c++, g++, clang++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: all on the CPU, of one dtype among fp32 / fp64, and built."""
    dtype = tensors[0].dtype
    if dtype not in SUFFIX or library() is None:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu:
            return False
    return True


def shrink(x: torch.Tensor, A: torch.Tensor, expert: torch.Tensor, token: torch.Tensor, pair: torch.Tensor,
           u: torch.Tensor) -> None:
    """u[pair[i]] = A[expert[i]] @ x[token[i]] for every sorted row i. x [T, n], A [E, r, n], u [T*k, r]."""
    x, A = x.contiguous(), A.contiguous()
    fn = _kernel("shrink", x.dtype)
    n, r, P = x.shape[1], A.shape[1], expert.shape[0]
    fn(x.data_ptr(), n, A.data_ptr(), r, expert.data_ptr(), token.data_ptr(), pair.data_ptr(), P,
       _threads(P, P * n * r), u.data_ptr())


def expand(u: torch.Tensor, coef: torch.Tensor, Bt: torch.Tensor, expert: torch.Tensor, token: torch.Tensor,
           pair: torch.Tensor, tile: int, out: torch.Tensor, accumulate: bool = True) -> None:
    """out[token[i]] += coef[pair[i]] * Bt[expert[i]]^T u[pair[i]] for every sorted row i, rows in tiles of `tile`
    tokens; not `accumulate`: each tile's rows are zeroed first, so out need not be initialized.
    u [T*k, r], coef [T*k] (u's dtype), Bt [E, r, m] contiguous or B [E, m, r] transposed (read in place),
    out [T, m] contiguous."""
    u, coef = u.contiguous(), coef.contiguous()
    if Bt.stride(2) != 1 and Bt.stride(1) != 1:
        Bt = Bt.contiguous()
    fn = _kernel("expand", out.dtype)
    (T, m), r, P = out.shape, u.shape[1], expert.shape[0]
    fn(u.data_ptr(), coef.data_ptr(), Bt.data_ptr(), r, m, *Bt.stride(), expert.data_ptr(), token.data_ptr(),
       pair.data_ptr(), P, T, tile, _threads(m // 64, P * m * r), int(accumulate), out.data_ptr())


def outer(left: torch.Tensor, right: torch.Tensor, expert: torch.Tensor, token: torch.Tensor, g: torch.Tensor) -> None:
    """g[expert[i]] += left[i]^T right[token[i]] for every sorted row i. left [P, a], right [T, n], g [E, a, n]."""
    left, right = left.contiguous(), right.contiguous()
    fn = _kernel("outer", g.dtype)
    (P, a), n = left.shape, right.shape[1]
    fn(left.data_ptr(), a, right.data_ptr(), n, expert.data_ptr(), token.data_ptr(), P, _threads(n // 64, P * n * a),
       g.data_ptr())


def _threads(ranges: int, work: int) -> int:
    """Threads for a call of `work` multiply-adds over `ranges` splittable ranges: one per torch thread, each with
    at least MIN_SPLIT of the work."""
    return max(1, min(torch.get_num_threads(), work // MIN_SPLIT, ranges))


def _kernel(name: str, dtype: torch.dtype):
    return getattr(library(), f"{name}_{SUFFIX[dtype]}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int64
    signatures = {"shrink": [p, i, p, i, p, p, p, i, i, p], "expand": [p, p, p, i, i, i, i, i, p, p, p, i, i, i, i, i, p],
                  "outer": [p, i, p, i, p, p, i, i, p]}
    for name, args in signatures.items():
        for suffix in SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, None
    return lib


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "lorahub_engine"


def _build_key(compiler: str) -> str:
    """Source, compiler and CPU (the build targets this machine's instruction set)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([compiler, *FLAGS, repr(OPTIONAL_FLAGS), platform.machine(), _cpu_flags()]).encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _build(compiler: str, path: Path) -> None:
    """Compile to a temporary file beside `path`, then rename: a concurrent or interrupted build leaves no half file.
    -march=native where the compiler knows it (GCC, Clang on x86), portable code otherwise; OpenMP where it has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        for optional in OPTIONAL_FLAGS:
            result = subprocess.run([compiler, *FLAGS, *optional, str(SOURCE), "-o", tmp], capture_output=True,
                                    text=True)
            if result.returncode == 0:
                os.replace(tmp, path)
                return
        raise subprocess.CalledProcessError(result.returncode, result.args, stderr=result.stderr)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
