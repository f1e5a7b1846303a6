#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go (under 9 minutes on one H200), each step's output under OUT_DIR:
#   triton_gpu_check   the compiled Triton backend against the fp64 einsum reference (bf16, fp16, fp32; outputs and
#                      the gradients of x, A, B and gates)
#   cuda_tests         the CUDA-only tests: planning, fixed routings (prefill, KV-cache decode) and every router's
#                      forward and training step never wait for the GPU
#   bench_grouped      the grouped op alone, inside a SmolLM2-shaped model, and its primitives (bf16, Triton)
#   bench_routers      SiRA / LoRAMoE against dense and per-expert-loop baselines, MoLE / Arrow against PEFT (bf16)
# Usage: benchmarks/gpu_checks.sh OUT_DIR   (from the repository root; needs torch, triton, transformers, peft)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0
status=0
step() {  # step NAME SECONDS COMMAND...: runs the command with a time limit, its output to OUT_DIR/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | grep -v -i warn
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)"
step triton_gpu_check 120 python3 -m tests.ops.triton_gpu_check
step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/ops/test_grouped_triton.py tests/routers/test_cuda.py tests/test_cuda.py -k cuda
step bench_routers 180 python3 -m benchmarks.bench_routers --device cuda --threads 1 --repeats 10 \
    --output "$out/bench_routers_cuda.json"
step bench_grouped 150 python3 -m benchmarks.bench_grouped --repeats 10 --out "$out/bench_grouped_cuda.json"
exit $status
