"""Compile every Triton kernel of the backend for a CUDA target without a GPU (run with TRITON_INTERPRET=0).

The interpreter runs the kernels' arithmetic on CPU but not the compiler's rules (tl.dot tile shapes, dtype
lowering, constexpr use): this drives the backend's own launchers on CPU tensors, captures each launch instead of
running it, and compiles it down to cubin for sm_90. Prints one line per compiled launch; exits non-zero on failure.

    TRITON_INTERPRET=0 python -m tests.ops.compile_triton
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorahub_engine.ops import triton_backend, triton_kernels
from lorahub_engine.ops.grouped import pair_coefficients

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = ("shrink_kernel", "expand_kernel", "outer_partial_kernel", "outer_reduce_kernel")
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


class Capture:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **constexprs)` records the launch."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((self.fn, args, constexprs))


def signature(fn, args, constexprs) -> dict:
    sig = {}
    for name, value in zip(fn.arg_names, args):
        sig[name] = "*" + TYPES[value.dtype] if isinstance(value, torch.Tensor) else "i32"
    return {**sig, **{name: "constexpr" for name in constexprs}}


def main() -> int:
    launches = []
    for name in KERNELS:
        setattr(triton_kernels, name, Capture(getattr(triton_kernels, name), launches))
    triton_backend._check_device = lambda idx: None  # CPU tensors: nothing is launched
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for E, r, d_in, d_out, k in ((16, 8, 576, 192, 2), (3, 3, 40, 24, 1)):
            idx = torch.randint(-1, E, (64, k), generator=g)
            x, A = torch.randn(64, d_in, dtype=dtype), torch.randn(E, r, d_in, dtype=dtype)
            B, scale = torch.randn(E, d_out, r, dtype=dtype), torch.ones(E)
            plan = triton_backend.plan(idx, E)
            u = triton_backend.shrink(x, A, plan)
            coef = pair_coefficients(scale, idx, torch.ones(idx.shape))
            triton_backend.expand(u, B, coef, plan, torch.zeros(64, d_out, dtype=dtype))
            triton_backend.outer(u, x, plan)
    for fn, args, constexprs in launches:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, args, constexprs), constexprs=constexprs),
                                  target=TARGET)
        assert "cubin" in compiled.asm, fn.__name__
        types = sorted({t for t in signature(fn, args, constexprs).values() if t.startswith("*fp") or t == "*bf16"})
        print(f"compiled {fn.__name__} {types} {constexprs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
