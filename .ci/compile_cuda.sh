#!/usr/bin/env bash
# CI: a CUDA build with the fused CUDA kernels (LONGNET_FUSED_CUDA=1: csrc/cuda/*.cu,
# off in a default build) compiled without a GPU, so that any nvcc error fails the
# build, and check that the resulting extension loads and registers its CUDA
# operators, engines and fused kernels. It is a user build (LONGNET_BUILD_TESTING
# unset: no engines for tests). The build goes to a temporary directory: the source
# tree keeps the CPU build the tests use.
#
# Environment: LONGNET_CUDA_VENV (virtual environment with a CUDA build of torch,
# created when missing; default ~/.cache/longnet-venv-cuda), LONGNET_CUDA_TORCH (its
# torch version, default 2.14.1), CUDA_HOME (default /usr/local/cuda),
# LONGNET_CUDA_ARCHS (default "9.0": one arch keeps CI fast), MAX_JOBS (default 2),
# LONGNET_WERROR (default 1: warnings of nvcc and of the host compiler are errors).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${LONGNET_CUDA_VENV:-$HOME/.cache/longnet-venv-cuda}"
TORCH_VERSION="${LONGNET_CUDA_TORCH:-2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "compile_cuda: creating $VENV with torch==$TORCH_VERSION (CUDA build)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" setuptools wheel ninja numpy
fi
echo "compile_cuda: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'), $(nvcc --version | tail -1)"

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/longnet-cuda-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

start=$SECONDS
env -u LONGNET_BUILD_TESTING LONGNET_FORCE_CUDA=1 LONGNET_FUSED_CUDA=1 \
  LONGNET_WERROR="${LONGNET_WERROR:-1}" LONGNET_CUDA_ARCHS="${LONGNET_CUDA_ARCHS:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"
echo "compile_cuda: built in $((SECONDS - start)) s"

# Load the CUDA build (no GPU needed) and check both operators have CUDA kernels, the
# CUDA engines and `fused` are built, and the engines for tests are not.
mkdir -p "$BUILD/pkg"
cp -r longnet "$BUILD/pkg/"
cp "$BUILD"/lib/longnet/_C*.so "$BUILD/pkg/longnet/"
(cd "$BUILD" && PYTHONPATH="$BUILD/pkg" "$VENV/bin/python" - <<'PY'
import torch
import longnet
import longnet.testing

assert longnet.__file__.startswith(__import__("os").environ["PYTHONPATH"]), longnet.__file__
for op in ("dilated_attention_fwd", "dilated_attention_bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"longnet::{op}", "CUDA"), op
assert longnet.HAS_CUDA
for engine in ("cuda_flash", "cuda_cudnn", "cuda_efficient", "fused"):
    assert longnet.engines.engine_built(engine), engine
assert longnet.testing.FUSED_CUDA and not longnet.testing.TESTING_BUILD
for engine in longnet.testing.CONTRACT_ENGINES:
    assert not longnet.testing.engine_built(engine), engine
print("compile_cuda: longnet._C loads with CUDA kernels for both operators, the CUDA engines "
      "and the fused CUDA kernels")
PY
)
