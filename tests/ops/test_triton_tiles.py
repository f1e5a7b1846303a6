"""The Triton kernels' tile loops: widths of several tiles with ragged tails, under the interpreter (fp32, fp16),
and the compiled kernels in bf16 / fp16 / fp32 on a GPU (skipped without CUDA: the interpreter cannot run bf16)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorahub_engine.ops import triton_backend
from tests.ops.test_grouped_torch import make_case
from tests.ops.test_grouped_triton import assert_close_scaled, run_both

# d_in 150 = 2 shrink K tiles + 22, d_out 130 = 2 expand N tiles + 2 (BLOCK_K = BLOCK_N = 64), and the reverse;
# outer's tiles (BLOCK_AB) run over both widths in the weight gradients.
WIDE = [(150, 130), (130, 150)]


def test_the_widths_span_several_ragged_tiles():
    for d_in, d_out in WIDE:
        assert d_in > 2 * triton_backend.BLOCK_K and d_in % triton_backend.BLOCK_K
        assert d_out > 2 * triton_backend.BLOCK_N and d_out % triton_backend.BLOCK_N
        assert min(d_in, d_out) > 2 * triton_backend.BLOCK_AB


@pytest.mark.parametrize("d_in,d_out", WIDE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wide_layers_match_reference_forward_and_grads(d_in, d_out, dtype):
    case = make_case(24, 4, 6, d_in, d_out, 2, seed=d_in, dtype=dtype)
    out, ref, grads, ref_grads = run_both(*case)
    assert out.dtype == dtype
    assert_close_scaled(out, ref, dtype)
    for mine, theirs in zip(grads, ref_grads):
        assert_close_scaled(mine, theirs, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bf16 runs only compiled, never interpreted")
def test_compiled_kernels_on_gpu_in_bf16_fp16_fp32():
    """Runs tests/ops/triton_gpu_check.py in a fresh interpreter with TRITON_INTERPRET=0 (the kernels must be
    decorated without the interpreter), whatever this session's conftest set."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "tests.ops.triton_gpu_check"], env=env, capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sum(line.startswith("ok ") for line in run.stdout.splitlines()) == 6
