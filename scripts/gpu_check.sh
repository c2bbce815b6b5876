#!/usr/bin/env bash
# On a GPU machine (the device tool): build, run every test (CUDA ones included), run
# compute-sanitizer memcheck on a small case, run the GPU benchmarks; logs and results go
# to $OUT (or benchmarks/results/ when OUT is unset). Wheels of missing pure-Python test
# dependencies may be carried in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 METRIX_OPS_CUDA=1
# The GPU image sets CXX=/opt/gcc/bin/g++, a wrapper whose builds segfault when a C++
# exception (any TORCH_CHECK) crosses into torch; the system compiler works.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
( time python3 -m pip install -q --no-build-isolation --no-deps -e . ) 2>&1 | tail -5 | tee "$OUT/build.log"
python3 -c "from metrix_ops import _ext; print('ext', _ext.HAS_EXT, 'cuda', _ext.HAS_CUDA_EXT)" | tee -a "$OUT/build.log"
TRITON_INTERPRET=0 python3 -X faulthandler -m pytest -q tests -p no:cacheprovider -rs > "$OUT/pytest_gpu.log" 2>&1; grep -E 'passed|failed|Fatal|File "/root|tests/' "$OUT/pytest_gpu.log" | head -30
compute-sanitizer --tool memcheck --error-exitcode 3 python3 -c "
import torch, metrix_ops
from metrix_ops.ops import sim_row_stats
x = torch.randn(37, 16, device='cuda'); r = torch.randn(301, 16, device='cuda')
for dt in (torch.float32, torch.float64, torch.bfloat16):
    out = sim_row_stats(x.to(dt), r.to(dt), 2.0, 64); torch.cuda.synchronize()
y = torch.randint(0, 5, (37,), device='cuda')
for name in ('MultiSimilarityLoss', 'ContrastiveLoss'):  # the row-chunk engine, fwd + bwd
    for dt in (torch.float32, torch.float64):
        e = x.to(dt).requires_grad_(True)
        getattr(metrix_ops.losses, name)(backend='cuda')(e, y).backward(); torch.cuda.synchronize()
print('memcheck case ran')
" 2>&1 | tail -4 | tee "$OUT/memcheck.log"
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
python3 benchmarks/bench_row_stats.py --device cuda --sizes 8192,32768,65536 --dims 128,512 \
  --dtypes float32,bfloat16 --out "$OUT/row_stats_gpu.json" 2>&1 | tail -14
# the losses: Triton and CUDA backends against PML and the product floor, fp32 (TF32 allowed,
# as PyTorch allows it when the flag is set) and bf16 autocast; PML only where B×B fits
for dt in float32 bfloat16; do
  python3 benchmarks/bench_losses.py --device cuda --tf32 --dtype $dt --loss multi_similarity \
    --impls triton,cuda,pml,floor --sizes 8192,32768 --dims 128,512 --repeats 5 \
    --out "$OUT/gpu_ms_$dt.json" 2>&1 | tail -4
  python3 benchmarks/bench_losses.py --device cuda --tf32 --dtype $dt --loss multi_similarity \
    --impls triton,cuda,floor --sizes 65536 --dims 128,512 --repeats 3 \
    --out "$OUT/gpu_ms_65536_$dt.json" 2>&1 | tail -2
  for loss in contrastive proxy_anchor; do
    python3 benchmarks/bench_losses.py --device cuda --tf32 --dtype $dt --loss $loss \
      --impls triton,cuda,pml,floor --sizes 8192 --dims 128,512 --repeats 5 \
      --out "$OUT/gpu_${loss}_$dt.json" 2>&1 | tail -2
  done
done
