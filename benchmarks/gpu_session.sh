#!/usr/bin/env bash
# One long call for a session that is lent a GPU (the `device` tool's `run`): builds the CUDA
# extension against the machine's CUDA torch, runs the CUDA correctness tests against the CPU
# reference, then the kernel and end-to-end benchmarks, and leaves everything under $OUT
# (raw logs + the benchmarks' own result files) to be copied into benchmarks/results/.
#
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# No network on the GPU machine: only what the working tree carries (no model weights; the
# benchmarks use real layer shapes with random weights).
set -uo pipefail
OUT=${OUT:-/tmp/tasa-gpu-out}
mkdir -p "$OUT"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/machine.txt" 2>&1
# build (CUDAExtension: torch has CUDA here); no isolation so the installed torch is used
TASA_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
export PYTHONPATH="$PWD:$PWD/python:${PYTHONPATH:-}"
python3 -c 'import tasa_ext; print(tasa_ext.build_info())' | tee -a "$OUT/machine.txt"
# correctness: CUDA vs the CPU/reference implementations on odd shapes and every bit mix
timeout 240 python3 -m pytest -q tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1; echo "pytest rc=$?" >> "$OUT/test_cuda.log"
tail -3 "$OUT/test_cuda.log"
# kernels: LLaMA-3-8B shapes, batch 1/4/16/64, vs torch fp16 and torch's int4 kernel
timeout 200 python3 benchmarks/bench_gemm.py --device cuda --batch 1 4 16 64 \
  --out "$OUT/gemm_cuda" > "$OUT/bench_gemm.log" 2>&1; echo "bench_gemm rc=$?" >> "$OUT/bench_gemm.log"
# end to end: LLaMA-3-8B-sized decoder stack, 128 tokens under CUDA graphs, fp16 vs 3.5-bit mix
timeout 120 python3 benchmarks/bench_e2e.py --device cuda --out-dir "$OUT" \
  > "$OUT/bench_e2e.log" 2>&1; echo "bench_e2e rc=$?" >> "$OUT/bench_e2e.log"
ls -la "$OUT"
