#!/usr/bin/env bash
# The test suite on the oldest versions the package promises, on the CPU: a venv with an old
# Python and torch, the CPU extension built in a copy of the tree (the main venv's build stays
# as it is), then pytest. Run by .ci/run after the main suite, twice:
# - default: Python 3.9 and torch 2.4.1 (pyproject.toml's floor), .venv-oldest, the suite but
#   its torch.compile tests (they pass there, 4 as expected failures, but Inductor's cold C++
#   builds take 12 min of CI's 90; the main suite runs them on torch 2.14). torch 2.4
#   brings triton 3.0, older than the Triton engine's launch.MIN_TRITON (3.2): the engine is
#   off there, and this checks it says so.
# - OLDEST_PRESET=triton32: torch 2.6.0 and the triton 3.2 it brings (the oldest the engine
#   takes; launch.FP64_DOT is False there: no fp64), .venv-triton32, the Triton engine's tests
#   under TRITON_INTERPRET=1, its torch.compile tests included.
# - OLDEST_PRESET=device (by hand, not in CI): the device machine's stack, Python 3.12,
#   torch 2.11.0+cu130 and its triton 3.6.0 (the lent GPU's image), .venv-device; the CUDA
#   sources built too (sm_90, against that torch's headers, with CUDA_HOME or
#   /usr/local/cuda), then the whole suite with the Triton engine under TRITON_INTERPRET=1.
#   A rehearsal before a device session: what breaks on that stack shows here, not in the
#   device's 15 minutes.
# By hand: bash scripts/oldest_check.sh [pytest args]
# Env (each overrides the preset's): PYTHON_OLDEST (the Python version, 3.9), TORCH_OLDEST
# (2.4.1), TORCHVISION_OLDEST (0.19.1), VENV_OLDEST (.venv-oldest), INTERPRET_OLDEST (0: the
# value of TRITON_INTERPRET for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

case "${OLDEST_PRESET:-}" in
  "") P_PY=3.9; P_TORCH=2.4.1; P_TV=0.19.1; P_VENV=.venv-oldest; P_INTERP=0
      P_NUMPY="numpy<2"; P_CUDA=0
      P_TESTS=(tests -k "not compile") ;;
  # (every Triton test, its torch.compile tests included, float64 ones reported as skipped;
  # the CPU engine's compile tests pass on torch 2.6 too, checked by hand with
  # `-k compile`, but their cold Inductor builds are slow: with them, a 2-core AMD EPYC had
  # run 38% of this selection after 17 min)
  triton32) P_PY=3.11; P_TORCH=2.6.0; P_TV=0.21.0; P_VENV=.venv-triton32; P_INTERP=1
      P_NUMPY="numpy<2"; P_CUDA=0
      P_TESTS=(tests -k "triton or test_versions or test_backend_auto") ;;
  # (numpy 2 below 2.4: the device's image has 2.5.2, but triton 3.6's interpreter takes a
  # scalar argument's value by int() of a 1-element array, which numpy 2.4 and later refuse,
  # so every Triton test fails under them; triton 3.8 squeezes first. The device runs the
  # kernels compiled, where this does not arise.)
  device) P_PY=3.12; P_TORCH=2.11.0; P_TV=0.26.0; P_VENV=.venv-device; P_INTERP=1
      P_NUMPY="numpy>=2,<2.4"; P_CUDA=1; P_TESTS=(tests) ;;
  *) echo "oldest: OLDEST_PRESET must be empty, triton32 or device"; exit 2 ;;
esac
WANT=${PYTHON_OLDEST:-$P_PY}
# a Python $WANT that runs (a pyenv shim exists for every installed version but fails unless
# that version is selected: look in pyenv's versions too)
PY=""
for c in "python$WANT" "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$WANT".*/bin/"python$WANT"; do
  if "$c" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$WANT'" >/dev/null 2>&1; then PY=$c; break; fi
done
if [ -z "$PY" ]; then
  echo "oldest: no Python $WANT found; the old torch runs on python3 instead"
  PY=python3
fi
echo "oldest: $PY"
TORCH=${TORCH_OLDEST:-$P_TORCH}
VENV="$root/${VENV_OLDEST:-$P_VENV}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# --no-cache-dir: each old torch brings ~3 GB of CUDA wheels; a cached copy of them on top of
# the installed one filled CI's disk once (the triton32 install, after the main and 2.4.1 venvs)
"$VENV/bin/python" -m pip install -q --no-cache-dir --upgrade pip >/dev/null
# numpy < 2 for the old torches: the numpy torch 2.4 was built against
"$VENV/bin/python" -m pip install -q --no-cache-dir "torch==$TORCH" "$P_NUMPY" "pytorch-metric-learning==2.9.*" \
  scikit-learn pytest pytest-xdist tqdm matplotlib ninja
# the training script's backbones: the torchvision of that torch
"$VENV/bin/python" -m pip install -q --no-cache-dir --no-deps "torchvision==${TORCHVISION_OLDEST:-$P_TV}" pillow

# a copy of the tree (tracked and untracked, not ignored files): its own in-place build
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
work="$top/main"
mkdir "$work"
[ -d "$root/../shared" ] && ln -s "$(cd "$root/../shared" && pwd)" "$top/shared"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work"
cd "$work"
if [ "$P_CUDA" = 1 ]; then  # as .ci/run builds it: one architecture
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0
fi
METRIX_OPS_CUDA=$P_CUDA MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace \
  > build.log 2>&1 || { tail -50 build.log; echo "oldest: the build failed"; exit 1; }
P_CUDA=$P_CUDA "$VENV/bin/python" - <<'PY'
import os
import sys
import torch
from metrix_ops import _ext
from metrix_ops.triton.launch import FP64_DOT, HAS_TRITON, TRITON_VERSION, why_not
print(f"oldest: python {sys.version.split()[0]}, torch {torch.__version__}, triton "
      f"{TRITON_VERSION} (engine {'on' if HAS_TRITON else 'off'}, fp64 {FP64_DOT}), "
      f"extension {_ext.HAS_EXT}")
if not _ext.HAS_EXT:
    raise SystemExit("oldest: the extension did not build")
if os.environ.get("P_CUDA") == "1" and not _ext.HAS_CUDA_EXT:
    raise SystemExit(f"oldest: the CUDA sources did not build or load: {_ext._IMPORT_ERROR}")
if not HAS_TRITON:
    print(f"oldest: backend='triton' is unavailable: {why_not(torch.device('cuda'))}")
elif not FP64_DOT:
    print(f"oldest: backend='triton' on float64: {why_not(torch.device('cuda'), torch.float64)}")
PY
# (.ci/run exports TRITON_INTERPRET=1; the preset says whether these tests run the kernels)
export TRITON_INTERPRET=${INTERPRET_OLDEST:-$P_INTERP}
set +e
# default: the preset's tests
if [ "$#" -eq 0 ]; then set -- "${P_TESTS[@]}"; fi
# -n: as the README's test command, a worker per core (PYTEST_WORKERS=0: one process)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-auto}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "oldest: pytest collected no tests"; exit 1; fi
exit "$rc"
