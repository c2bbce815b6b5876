#!/usr/bin/env bash
# The test suite on the oldest versions the package promises (pyproject.toml: Python >= 3.9,
# torch >= 2.4), on the CPU: a venv .venv-oldest with python3.9 and torch 2.4.1 (and the
# triton 3.0 it brings, older than the Triton engine's launch.MIN_TRITON, 3.5: the engine is
# off there, and this checks it says so), the CPU extension built in a copy of the tree (the
# main venv's build stays as it is), then pytest. Run by .ci/run after the main suite; by hand:
#   bash scripts/oldest_check.sh [pytest args]   (default: the suite but its torch.compile tests)
# Env: PYTHON_OLDEST (python3.9), TORCH_OLDEST (2.4.1), TORCHVISION_OLDEST (0.19.1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# a Python 3.9 that runs (a pyenv shim exists for every installed version but fails unless
# that version is selected: look in pyenv's versions too)
PY=""
for c in ${PYTHON_OLDEST:-} python3.9 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.9*/bin/python3.9; do
  if "$c" -c "import sys; assert sys.version_info[:2] == (3, 9)" >/dev/null 2>&1; then PY=$c; break; fi
done
if [ -z "$PY" ]; then
  echo "oldest: no Python 3.9 found; the oldest torch runs on python3 instead"
  PY=python3
fi
echo "oldest: $PY"
TORCH=${TORCH_OLDEST:-2.4.1}
VENV="$root/.venv-oldest"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# numpy < 2: the numpy torch 2.4 was built against
"$VENV/bin/python" -m pip install -q "torch==$TORCH" "numpy<2" "pytorch-metric-learning==2.9.*" \
  scikit-learn pytest tqdm matplotlib ninja
# the training script's backbones: the torchvision of that torch
"$VENV/bin/python" -m pip install -q --no-deps "torchvision==${TORCHVISION_OLDEST:-0.19.1}" pillow

# a copy of the tree (tracked and untracked, not ignored files): its own in-place build
top=$(mktemp -d)
trap 'rm -rf "$top"' EXIT
work="$top/main"
mkdir "$work"
[ -d "$root/../shared" ] && ln -s "$(cd "$root/../shared" && pwd)" "$top/shared"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work"
cd "$work"
METRIX_OPS_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace \
  > build.log 2>&1 || { tail -50 build.log; echo "oldest: the build failed"; exit 1; }
"$VENV/bin/python" - <<'PY'
import sys
import torch
from metrix_ops import _ext
from metrix_ops.triton.launch import HAS_TRITON, TRITON_VERSION, why_not
print(f"oldest: python {sys.version.split()[0]}, torch {torch.__version__}, triton "
      f"{TRITON_VERSION} (engine {'on' if HAS_TRITON else 'off'}), extension {_ext.HAS_EXT}")
if not _ext.HAS_EXT:
    raise SystemExit("oldest: the extension did not build")
if not HAS_TRITON:
    print(f"oldest: backend='triton' is unavailable: {why_not(torch.device('cuda'))}")
PY
unset TRITON_INTERPRET  # (.ci/run exports it; the Triton engine is off here either way)
set +e
# default: every test but the torch.compile ones, which torch 2.4's dynamo and Inductor fail
# in 12 places (README: "Oldest versions")
if [ "$#" -eq 0 ]; then set -- tests -k "not compile"; fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "oldest: pytest collected no tests"; exit 1; fi
exit "$rc"
