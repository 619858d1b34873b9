#!/usr/bin/env bash
# Session 8, call 1: the warp-specialized (Gluon) GEMM: correctness, then per-GEMM timings.
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
export TORCH_EXTENSIONS_DIR=/tmp/te
timeout 240 python3 -m pytest -q -x tests/kernels/test_grouped_gemm_ws.py 2>&1 | tail -25 | tee $OUT/test_ws.txt
rc=${PIPESTATUS[0]}
echo "ws tests rc=$rc"
if [ "$rc" != 0 ]; then exit 0; fi
OUT=$OUT timeout 330 python3 tools/bench_grouped_gemm.py --parts check,gemm,wssweep --graph --no-pointer \
  --gemm-shapes "8,768,2048;8,2048,5632" 2>&1 | tee $OUT/bench.txt | tail -80
