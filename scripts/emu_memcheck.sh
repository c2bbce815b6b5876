#!/usr/bin/env bash
# The CUDA engine's kernels on the CPU emulator (tests/cuda_emu) under AddressSanitizer: what
# compute-sanitizer's memcheck checks on a GPU, for global memory, on a machine without one. A
# kernel that reads or writes past a tensor's memory stops the run with ASan's report (the
# kernel, the access, the allocation); shared-memory bounds, races and reads of unwritten
# memory are the emulator's own checks, on in every run.
#
#     bash scripts/emu_memcheck.sh                       # the CUDA test files (about 20 min)
#     bash scripts/emu_memcheck.sh tests/test_cuda_ee.py -k triplet
#
# Needs the setup's .venv with the CUDA kernels compiled (bash scripts/setup.sh) and gcc's
# libasan; the ASan build of the emulator goes to build/cuda_emu_asan (a few minutes once).
set -euo pipefail
cd "$(dirname "$0")/.."
asan=$(gcc -print-file-name=libasan.so)
if [ ! -e "$asan" ]; then echo "emu_memcheck: gcc's libasan.so was not found" >&2; exit 1; fi
# leaks: Python's own allocations are never freed at exit; the rest are ASan's defaults.
# libstdc++ is preloaded after it: ASan intercepts __cxa_throw only if libstdc++ is loaded
# when it starts (python itself does not link it)
export EMU_ASAN=1 TRITON_INTERPRET=1 ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
if [ "$#" -eq 0 ]; then set -- tests/test_emu_runtime.py tests/test_cuda_*.py; fi
LD_PRELOAD="$asan $(gcc -print-file-name=libstdc++.so)" exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
