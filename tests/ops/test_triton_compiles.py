"""The Triton kernels compile for a real GPU target (sm_90, fp16 / bf16 / fp32) on this GPU-less machine.

The interpreter tests check the kernels' arithmetic; this checks what only the compiler enforces, with the block
sizes the backend's launchers really choose. It runs tests/ops/compile_triton.py in a fresh interpreter, since the
kernels must be decorated with TRITON_INTERPRET unset.
"""

import os
import subprocess
import sys
from pathlib import Path


def test_every_launch_of_the_triton_backend_compiles_to_cubin():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.ops.compile_triton"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 24 and all(line.startswith("compiled ") for line in lines)  # 4 kernels x 2 shapes x 3 dtypes
    assert sum("'*bf16'" in line for line in lines) == 6
