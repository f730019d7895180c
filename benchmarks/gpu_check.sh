#!/usr/bin/env bash
# GPU check for a fresh CUDA machine: build the extension with its CUDA kernels and
# engines, run the CUDA tests and print the correctness result per engine (cuda_flash,
# cuda_cudnn, cuda_efficient, math, fused), then the contract tests of the same kernels'
# CPU contract engines (a lean subset; CI runs them all), then the GPU benchmark (every
# engine against dense SDPA on the same kernel, gather+SDPA, FlexAttention; packed
# documents packed vs one call each; largest N).
# Every step has a time limit; the whole run stays under 9 minutes (build about 1.5,
# CUDA tests at most 2.5, contract tests at most 1, benchmark at most 4).
#
# Usage: benchmarks/gpu_check.sh [--quick]   (LONGNET_CUDA_ARCHS defaults to 9.0;
# LONGNET_WHEELS=<dir> installs a missing pytest from local wheels, offline)
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK="${1:-}"
step() { echo "[$(date +%H:%M:%S)] == $*"; }

step "environment"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! python3 -c "import pytest" 2>/dev/null; then
  if [ -n "${LONGNET_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --find-links "$LONGNET_WHEELS" pytest || true
  fi
fi

step "build (LONGNET_FORCE_CUDA=1 LONGNET_FUSED_CUDA=1 LONGNET_BUILD_TESTING=1, archs ${LONGNET_CUDA_ARCHS:-9.0})"
start=$SECONDS
if ! LONGNET_FORCE_CUDA=1 LONGNET_FUSED_CUDA=1 LONGNET_BUILD_TESTING=1 LONGNET_CUDA_ARCHS="${LONGNET_CUDA_ARCHS:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    python3 setup.py -q build_ext --inplace > /tmp/longnet_gpu_build.log 2>&1; then
  tail -60 /tmp/longnet_gpu_build.log
  step "build FAILED"
  exit 1
fi
echo "built in $((SECONDS - start)) s"
python3 -c "import longnet; print('HAS_CUDA', longnet.HAS_CUDA, 'engines', [e for e in longnet.engines.ENGINES if longnet.engines.engine_built(e)])"

step "tests/test_cuda.py (per engine)"
rc_tests=0
if python3 -c "import pytest" 2>/dev/null; then
  # -v streams one line per test, so a summary per engine survives the time limit.
  LONGNET_POISON_OUTPUTS=1 timeout 150 python3 -m pytest -v -rf --maxfail=25 -p no:cacheprovider \
    tests/test_cuda.py > /tmp/longnet_gpu_tests.log 2>&1
  rc_tests=$?
  for engine in cuda_flash cuda_cudnn cuda_efficient math fused; do
    grep -E "^tests/test_cuda.py::([^ ]*[[-]${engine}[]-]|test_${engine}_)" /tmp/longnet_gpu_tests.log |
      awk -v e="$engine" '{n[$2]++} END {printf "  %-15s passed %4d  failed %3d  skipped %3d  errors %3d\n", e, n["PASSED"], n["FAILED"], n["SKIPPED"], n["ERROR"]}'
  done
  grep -E "^(FAILED|ERROR)|Timeout|timed out" /tmp/longnet_gpu_tests.log | head -25
  tail -2 /tmp/longnet_gpu_tests.log
  step "tests/test_contract_engines.py (contract engines on CPU, subset)"
  timeout 60 python3 -m pytest -q -rf -p no:cacheprovider tests/test_contract_engines.py \
    -k "kernel or odd_offsets or strided_grad_out or custom_scale or d64" 2>&1 | tail -8
  rc_contract=${PIPESTATUS[0]}
  [ "$rc_tests" -eq 0 ] && rc_tests=$rc_contract
else
  echo "pytest is not installed: tests skipped"
  rc_tests=2
fi
echo "tests exit code: $rc_tests"

step "benchmarks/bench_gpu.py $QUICK"
timeout 240 python3 benchmarks/bench_gpu.py $QUICK
echo "benchmark exit code: $?"
step "done"
exit "$rc_tests"
