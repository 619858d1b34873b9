#!/usr/bin/env bash
# The test command (README): every test, CPU only. Slow multi-process tests are marked `slow`
# and still run; GPU tests are marked `gpu` and skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# DeepSpeed JIT-builds a CPU op; a private extensions dir keeps jobs from sharing a stale lock.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(mktemp -d -t moc-ext-XXXXXX)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# --durations: the suite should stay under ~15 min on the 2-core CI machine (17 min in session 22).
exec python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
