"""The compiled CPU kernels: each primitive against the torch walk of the same plan and against the einsum reference,
across the widths where their vector and rank blocking have tails; threads; the build and its fallbacks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorahub_engine.ops import grouped_lora, native, torch_backend
from tests.ci import IN_CI
from tests.ops.reference import grouped_lora_reference

pytestmark = pytest.mark.skipif(native.library() is None and not IN_CI,
                                reason="no C++ compiler: the kernels cannot be built (under CI=true this fails)")


@pytest.fixture(autouse=True)
def no_dense_walk(monkeypatch):
    """The kernels' own walk for every bank here (the backend walks narrow banks densely)."""
    monkeypatch.setattr(torch_backend, "DENSE_COLUMNS_PER_SLOT", 0)


def test_the_kernels_are_built():
    """Skipped without a compiler outside CI; under CI=true a missing compiler fails here, not silently skips."""
    assert native.library() is not None, "no C++ compiler built lorahub_engine/ops/cpu_kernels.cpp (set CXX)"


def case(T, E, r, d_in, d_out, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    A = torch.randn(E, r, d_in, generator=g, dtype=dtype)
    B = torch.randn(E, d_out, r, generator=g, dtype=dtype)
    idx = torch.randint(-1, E - 1, (T, k), generator=g)  # -1 = none
    idx[0, 0] = E - 1  # an expert with a single row
    return x, A, B, idx


def walk_both(monkeypatch, fn):
    """fn() with the compiled kernels, then with torch ops alone."""
    compiled = fn()
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        return compiled, fn()


# widths around the vector (8 fp32 lanes with AVX2, 16 with AVX-512, half as many fp64; expand and outer step one or
# two vectors) and rank blocks (4 and 8; r = 8 and 9 read B through the in-register transpose)
@pytest.mark.parametrize("r,d_in,d_out", [(1, 5, 3), (3, 16, 33), (4, 31, 64), (5, 70, 17), (8, 64, 96), (9, 33, 130),
                                          (16, 128, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_primitives_match_the_torch_walk(r, d_in, d_out, dtype, monkeypatch):
    assert_primitives_match_the_torch_walk(r, d_in, d_out, dtype, monkeypatch)


def test_the_avx512_layout_matches_the_torch_walk_on_any_machine(tmp_path, monkeypatch):
    """The kernels built with 64-byte vectors (-DLORAHUB_VECTOR_BYTES=64: AVX-512's layout, 16 fp32 lanes, two
    vectors per pass, the 16 x 8 transpose), which a build for an AVX2 machine never runs, against the torch walk."""
    compiler = native.compiler_path()
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\nexec "{compiler}" -DLORAHUB_VECTOR_BYTES=64 "$@"\n')
    wrapper.chmod(0o755)
    try:
        with monkeypatch.context() as m:
            m.setenv("CXX", str(wrapper))
            m.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
            native.library.cache_clear()
            assert native.library() is not None
            for r, d_in, d_out in [(8, 64, 96), (9, 33, 130), (3, 16, 33)]:
                for dtype in (torch.float32, torch.float64):
                    assert_primitives_match_the_torch_walk(r, d_in, d_out, dtype, monkeypatch)
    finally:
        native.library.cache_clear()  # the usual build again for the tests after this one


def assert_primitives_match_the_torch_walk(r, d_in, d_out, dtype, monkeypatch):
    T, E, k = 45, 5, 3
    x, A, B, idx = case(T, E, r, d_in, d_out, k, dtype, seed=r + d_in)
    plan = torch_backend.plan(idx, E)
    assert plan.walk(A.shape[1], x, A) == "compiled"
    g = torch.Generator().manual_seed(1)
    u = torch.randn(T * k, r, generator=g, dtype=dtype)
    coef = torch.rand(T * k, generator=g, dtype=dtype)
    start = torch.randn(T, d_out, generator=g, dtype=dtype)
    left = torch.randn(T * k, r, generator=g, dtype=dtype)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {}
    for prim in (lambda: plan.shrink(x, A), lambda: plan.expand(u, B, coef, start.clone()),
                 lambda: plan.expand(u, B, coef, None), lambda: plan.outer(left, x)):
        compiled, torch_only = walk_both(monkeypatch, prim)
        torch.testing.assert_close(compiled, torch_only, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_and_gradients_match_reference(dtype):
    x, A, B, idx = case(200, 6, 8, 40, 24, 2, dtype)
    scale = torch.rand(6, dtype=dtype) + 0.5
    gates = torch.rand(idx.shape, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    refs = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ours = grouped_lora(leaves[0], leaves[1], leaves[2], scale, idx, leaves[3], backend="torch")
    ref = grouped_lora_reference(refs[0], refs[1], refs[2], scale, idx, refs[3])
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(ours, ref, **tol)
    grad = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    ours.backward(grad)
    ref.backward(grad)
    for mine, theirs in zip(leaves, refs):
        torch.testing.assert_close(mine.grad, theirs.grad, **tol)


def test_threads_split_the_work_without_changing_a_bit(monkeypatch):
    x, A, B, idx = case(300, 4, 8, 200, 300, 2, torch.float32)
    plan = torch_backend.plan(idx, 4)
    u = plan.shrink(x, A)
    coef = torch.rand(idx.numel())

    def primitives():
        return plan.shrink(x, A), plan.expand(u, B, coef, torch.zeros(300, 300)), plan.outer(u, x)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = primitives()
        monkeypatch.setattr(native, "MIN_SPLIT", 1)
        torch.set_num_threads(3)
        split = primitives()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, split):
        assert torch.equal(a, b)


OPENMP_RUNTIMES = """
import sys
from pathlib import Path
import torch
def runtimes():
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if any(n in line for n in ("libgomp", "libomp", "libiomp"))}
before = runtimes()
from lorahub_engine.ops import native
assert native.library() is not None
print(len(before), len(runtimes() - before))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mapped libraries (Linux)")
def test_the_kernels_share_torchs_openmp_runtime():
    """Loading the kernels maps no OpenMP runtime besides torch's: they fork onto the threads torch's ops use, not
    onto a second pool competing with it for the cores. (A fresh process: other libraries, faiss, bring their own.)"""
    result = subprocess.run([sys.executable, "-c", OPENMP_RUNTIMES], capture_output=True, text=True, check=True)
    torchs, added = map(int, result.stdout.split())
    assert torchs == 1 and added == 0, result.stdout


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """library() from scratch into an empty cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path / "lorahub_engine"
    native.library.cache_clear()


def test_builds_once_into_the_cache(fresh_build):
    assert native.library() is not None
    (built,) = fresh_build.iterdir()
    assert built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_a_failing_compiler_falls_back_to_torch_and_leaves_no_file(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="uses torch ops"):
        assert native.library() is None
    assert not any(fresh_build.iterdir())
    x = torch.randn(20, 4)
    assert not native.supports(x)


def test_disabled_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("LORAHUB_ENGINE_NATIVE", "0")
    assert native.library() is None
    assert not fresh_build.exists()


def test_supports_only_cpu_fp32_fp64_of_one_dtype():
    f32, f64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    assert native.supports(f32, f32) and native.supports(f64)
    assert not native.supports(f32, f64)
    assert not native.supports(torch.zeros(2, dtype=torch.float16))
    assert not native.supports(torch.zeros(2, dtype=torch.bfloat16))
