#!/usr/bin/env bash
# Sets up .venv on a fresh machine and builds metrix_ops into it (CPU part always; the CUDA
# part whenever a CUDA toolkit is found, so the CUDA sources compile and link even without
# a GPU). Used by the README's two commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch 2.14.1 is the CUDA 13.0 build on these machines (served from local disk)
python -m pip install -q "torch==2.14.1"
python -m pip install -q "pytorch-metric-learning==2.9.*" scikit-learn pytest pytest-xdist tqdm matplotlib numpy ninja
# ResNet backbones for the training script's image-folder runs (the build matching torch 2.14)
python -m pip install -q --no-deps "torchvision==0.29.1" pillow

# The toolkit root (bin/nvcc + include/cuda_runtime.h). The nvcc on PATH may be a wrapper
# script, so torch's own guess can be wrong: setup.py resolves it the same way.
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then export CUDA_HOME="$c"; fi
  done
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}
if [ -n "${CUDA_HOME:-}" ] && [ -z "${METRIX_OPS_CUDA:-}" ]; then export METRIX_OPS_CUDA=1; fi
echo "setup: CUDA_HOME=${CUDA_HOME:-none} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
python -m pip install -q --no-build-isolation -e .
python - <<'PY'
import os
from metrix_ops import _ext
print(f"setup: extension built={_ext.HAS_EXT} cuda kernels compiled={_ext.HAS_CUDA_EXT}")
if not _ext.HAS_EXT:
    raise SystemExit("setup: the extension did not build")
if os.environ.get("METRIX_OPS_CUDA") == "1" and not _ext.HAS_CUDA_EXT:
    raise SystemExit("setup: a CUDA toolkit was found but the CUDA kernels were not compiled")
PY
