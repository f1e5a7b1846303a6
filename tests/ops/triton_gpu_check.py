"""The compiled Triton backend on a CUDA GPU against the fp64 einsum reference, outputs and gradients, in bf16, fp16
and fp32, on small widths and on widths of several ragged tiles. Run with TRITON_INTERPRET=0 (the interpreter
cannot run bf16); prints one "ok" line per case, exits non-zero at the first mismatch.

    TRITON_INTERPRET=0 python -m tests.ops.triton_gpu_check
"""

import os
import sys

import torch

from lorahub_engine.ops import grouped_lora
from tests.ops.reference import grouped_lora_reference
from tests.ops.test_grouped_torch import make_case

# relative to each tensor's largest entry: the inputs are rounded alike, so only accumulation and output rounding differ
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def check(T, E, r, k, d_in, d_out, dtype) -> str:
    x, A, B, scale, idx, gates = (t.cuda() for t in make_case(T, E, r, d_in, d_out, k, seed=T + d_in, dtype=dtype))
    ours = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    refs = [t.detach().double().requires_grad_() for t in (x, A, B, gates)]
    out = grouped_lora(*ours[:3], scale, idx, ours[3], backend="triton")
    ref = grouped_lora_reference(*refs[:3], scale.double(), idx, refs[3])
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).cuda()
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    assert out.dtype == dtype
    worst = 0.0
    for name, mine, theirs in zip(["out", "grad_x", "grad_A", "grad_B", "grad_gates"],
                                  [out] + [t.grad for t in ours], [ref] + [t.grad for t in refs]):
        err = float((mine.double() - theirs).abs().max() / theirs.abs().max().clamp(min=1.0))
        if err > TOL[dtype]:
            raise AssertionError(f"{dtype} {(T, E, r, k, d_in, d_out)}: {name} off by {err:.2e} of its max")
        worst = max(worst, err)
    return f"ok {str(dtype)[6:]} T={T} E={E} r={r} k={k} in={d_in} out={d_out} worst={worst:.1e}"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("needs CUDA and TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in ((37, 5, 3, 2, 11, 7), (300, 16, 8, 2, 150, 130)):
            print(check(*shape, dtype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
