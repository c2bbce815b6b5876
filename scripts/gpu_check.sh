#!/usr/bin/env bash
# On a GPU machine (the device tool): build, run the GPU tests (CUDA and Triton kernels on the
# device), compute-sanitizer memcheck on a small case, then the GPU benchmarks, most important
# first. Every stage runs under a deadline (BUDGET_S seconds from the start, default 560) so the
# script ends inside one device call (the build takes about 40 s with 12 jobs, the GPU tests
# about 2 min with 8 workers on an H200 machine); what ran is packed after each stage into
# $OUT/gpu_results.tgz (one file: the device tool returns at most 8) and, without OUT, left in
# benchmarks/results/gpu/. GPU_TESTS=all runs the whole suite instead of the GPU
# files; SKIP_BENCH=1 stops after memcheck. Wheels of missing pure-Python packages (PML) may be
# carried in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
RES=${OUT:+/tmp/gpu_results}
RES=${RES:-benchmarks/results/gpu}
mkdir -p "$RES"
left() { echo $((START + BUDGET_S - $(date +%s))); }
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_results.tgz" -C "$RES" . ; echo "[$(( $(date +%s) - START ))s] $1"; }
# run a command for at most min($1, time left - 5) seconds
limited() { local t=$1; shift; local l=$(( $(left) - 5 )); [ "$l" -lt "$t" ] && t=$l
  if [ "$t" -le 5 ]; then echo "skipped (no time left): $*"; return 124; fi
  timeout "$t" "$@"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for benchmarks/
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$RES/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RES/gpu.txt"
export TORCH_CUDA_ARCH_LIST=9.0 METRIX_OPS_CUDA=1
# The GPU image sets CXX=/opt/gcc/bin/g++, a wrapper whose builds segfault when a C++
# exception (any TORCH_CHECK) crosses into torch; the system compiler works.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi

export MAX_JOBS=${MAX_JOBS:-12}
( time limited 330 python3 setup.py build_ext --inplace ) > "$RES/build.log" 2>&1
tail -4 "$RES/build.log"
python3 -c "from metrix_ops import _ext; print('ext', _ext.HAS_EXT, 'cuda', _ext.HAS_CUDA_EXT, _ext._IMPORT_ERROR)" | tee -a "$RES/build.log"
pack "build done"
TEST_OPTS="-q -p no:cacheprovider -rs --timeout=120 -n 8"
if [ "${GPU_TESTS:-gpu}" = all ]; then
  TESTS=tests
else  # the files with GPU cases: the Triton engine, the CUDA ops, autocast, mixed batches, auto,
      # labels and proxies on another device
  TESTS="tests/test_triton_*.py tests/test_cuda_*.py tests/test_row_stats_op.py
         tests/test_autocast.py tests/test_metrix_mixed_batch.py tests/test_backend_auto.py
         tests/test_metrix_refs.py tests/test_metrix_pos_pos.py tests/test_labels_device.py
         tests/test_miner_counts.py tests/test_deterministic.py tests/test_cudagraph_tags.py
         tests/test_other_device.py tests/test_func_transforms.py tests/test_eager_autograd.py"
fi
TRITON_INTERPRET=0 limited 300 python3 -m pytest $TEST_OPTS $TESTS > "$RES/pytest_gpu.log" 2>&1
echo "GPU tests: $(tail -1 "$RES/pytest_gpu.log")"
grep -E '^(FAILED|ERROR)' "$RES"/pytest_*.log | cut -c1-200 | head -20
pack "tests done"

limited 100 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -c "
import torch, metrix_ops
from metrix_ops.ops import sim_row_stats
x = torch.randn(37, 16, device='cuda'); r = torch.randn(301, 16, device='cuda')
for dt in (torch.float32, torch.float64, torch.bfloat16):
    out = sim_row_stats(x.to(dt), r.to(dt), 2.0, 64); torch.cuda.synchronize()
y = torch.randint(0, 5, (37,), device='cuda')
for name in ('MultiSimilarityLoss', 'ContrastiveLoss', 'CircleLoss', 'NTXentLoss', 'SupConLoss',
             'GeneralizedLiftedStructureLoss', 'NPairsLoss', 'TripletMarginLoss', 'HPHNTripletLoss'):
    for dt in (torch.float32, torch.float64):  # the row-chunk engine, fwd + bwd
        e = x.to(dt).requires_grad_(True)
        getattr(metrix_ops.losses, name)(backend='cuda')(e, y).backward(); torch.cuda.synchronize()
e = x.clone().requires_grad_(True)  # Metrix MS on the CUDA engine
metrix_ops.losses.MultiSimilarityLoss(backend='cuda', metrix=metrix_ops.Metrix(lam=0.3))(e, y).backward()
for name in ('ContrastiveLoss', 'CircleLoss', 'GeneralizedLiftedStructureLoss'):
    e = x.clone().requires_grad_(True)
    getattr(metrix_ops.losses, name)(backend='cuda', metrix=metrix_ops.Metrix(lam=0.3))(e, y).backward()
for miner in (metrix_ops.miners.MultiSimilarityMiner(0.1),):  # miner= inside the CUDA ops
    e = x.clone().requires_grad_(True)
    metrix_ops.losses.MultiSimilarityLoss(backend='cuda', miner=miner)(e, y).backward()
for miner in (metrix_ops.miners.TripletMarginMiner(0.2, type_of_triplets='semihard'),):
    e = x.clone().requires_grad_(True)
    metrix_ops.losses.TripletMarginLoss(backend='cuda', miner=miner, smooth_loss=True)(e, y).backward()
torch.cuda.synchronize()
for name in ('ProxyAnchorLoss', 'ProxyNCALoss'):
    fn = getattr(metrix_ops.losses, name)(5, 16, backend='cuda').cuda()
    e = x.clone().requires_grad_(True); fn(e, y).backward(); torch.cuda.synchronize()
    for pairs in ('pos_neg', 'pos_pos'):  # Metrix: csrc/cuda/proxy_metrix_cuda.cu
        fn = getattr(metrix_ops.losses, name)(5, 16, backend='cuda',
                                              metrix=metrix_ops.Metrix(lam=0.3, pairs=pairs)).cuda()
        e = x.clone().requires_grad_(True); fn(e, y).backward(); torch.cuda.synchronize()
for n in (2, 9):  # EE-HPHN: csrc/cuda/ee_point_mine_cuda.cu (9: a segment over two warps)
    fn = metrix_ops.losses.HPHNTripletLoss(backend='cuda', expansion=metrix_ops.Expansion(n_points=n))
    e = x.clone().requires_grad_(True); fn(e, y).backward(); torch.cuda.synchronize()
for name in ('MultiSimilarityLoss', 'LiftedStructureLoss', 'NPairsLoss', 'TripletMarginLoss'):
    for n in (0, 3):  # EE of the other losses: csrc/cuda/ee_losses_cuda.cu, chunks of 7 rows
        import metrix_ops.fused.cuda_ee_losses as cel; cel.GPU_CHUNK = 7
        fn = getattr(metrix_ops.losses, name)(backend='cuda', expansion=metrix_ops.Expansion(n_points=n))
        e = x.clone().requires_grad_(True); fn(e, y).backward(); torch.cuda.synchronize()
cel.GPU_CHUNK = 512
import metrix_ops.fused.cuda_metrix_refs as cmr; cmr.CHUNK = 7  # Metrix against a bank
r = torch.randn(301, 16, device='cuda'); yr = torch.randint(0, 7, (301,), device='cuda')
for name in ('MultiSimilarityLoss', 'ContrastiveLoss', 'CircleLoss', 'GeneralizedLiftedStructureLoss'):
    for pairs in ('pos_neg', 'anchor_neg'):  # csrc/cuda/*_metrix_cuda.cu's refs ops
        e, q = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        getattr(metrix_ops.losses, name)(backend='cuda', metrix=metrix_ops.Metrix(lam=0.3, pairs=pairs))(
            e, y, ref_emb=q, ref_labels=yr).backward(); torch.cuda.synchronize()
cmr.CHUNK = 1024
t = metrix_ops.miners.MultiSimilarityMiner(0.1)(x, y)  # indices_tuple: pair_sims_cuda.cu
for name in ('ContrastiveLoss', 'MultiSimilarityLoss', 'TripletMarginLoss'):
    e = x.clone().requires_grad_(True)
    getattr(metrix_ops.losses, name)(backend='cuda')(e, y, t).backward(); torch.cuda.synchronize()
e = x.clone().requires_grad_(True)  # ProxyAnchor's tuple: the weighted op
metrix_ops.losses.ProxyAnchorLoss(5, 16, backend='cuda').cuda()(e, y, t).backward()
torch.cuda.synchronize()
print('memcheck case ran')
" > "$RES/memcheck.log" 2>&1
tail -3 "$RES/memcheck.log"
pack "memcheck done"
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0

# Benchmarks, most wanted first (issue 4's target case B=8192, D=512): Triton and CUDA against
# PML and the matrix-product floor; fp32 with TF32 allowed (as PyTorch allows it) and bf16 autocast.
bench() { local name=$1; shift
  limited 120 python3 benchmarks/bench_losses.py --device cuda --tf32 --out "$RES/$name.json" "$@" \
    2>&1 | tee "$RES/$name.log" | grep -v '^{"B"' | tail -4
  # backend="auto"'s GPU order from this run's results so far: the proposal for
  # metrix_ops/gpu_order.json (derive it again with the results kept in benchmarks/results/)
  python3 benchmarks/derive_gpu_order.py "$RES"/gpu_*.json --out "$RES/gpu_order.json" \
    > "$RES/gpu_order.txt" 2>&1
  pack "bench $name"; }
bench gpu_ms_float32 --loss multi_similarity --impls triton,cuda,cuda-general,pml,floor --sizes 8192 --dims 512,128 --repeats 10
# where the time goes at the target size: kernels by device time, wall against their sum
for eng in MultiSimilarityLoss:cuda MultiSimilarityLoss:triton ProxyAnchorLoss:triton; do
  limited 60 python3 benchmarks/profile_gpu.py --loss ${eng%:*} --backend ${eng#*:} --b 8192 --d 512 \
    >> "$RES/profile.txt" 2>&1; grep "busy" "$RES/profile.txt" | tail -1
done
pack "profiles"
# the per-call cost under CUDA graphs: torch.compile(mode="reduce-overhead") against eager
bench gpu_ms_graphs_float32 --loss multi_similarity --impls cuda,cuda+graphs,triton,triton+graphs --sizes 2048,8192 --dims 512 --repeats 10
# B = 65536: where the fold and G kernels dominate (GPU_NOTES.md's prediction)
bench gpu_ms_large_float32 --loss multi_similarity --impls triton,cuda,cuda-general,floor --sizes 32768,65536 --dims 512,128 --repeats 3
# Triton tile sizes (METRIX_OPS_TRITON_TILES) for MS, each checked against the default's result
limited 120 python3 benchmarks/sweep_triton.py --sizes 8192,65536 --d 512 --repeats 3 \
  --out "$RES/sweep_triton.json" 2>&1 | tail -n 16
pack "triton tile sweep"
for loss in contrastive proxy_anchor ntxent supcon circle triplet hphn; do
  bench "gpu_${loss}_float32" --loss $loss --impls triton,cuda,floor,pml --sizes 8192 --dims 512 --repeats 10
done
# embedding-level Metrix on the Triton and CUDA engines against the clean loss
# (csrc/cuda/*_metrix_cuda.cu: twenty-second session; proxy_metrix_cuda.cu: twenty-third)
for loss in metrix_ms metrix_contrastive metrix_circle metrix_generalized_lifted metrix_proxy_nca metrix_proxy_anchor; do
  bench "gpu_${loss}_float32" --loss $loss --impls triton,cuda,clean,pml --sizes 8192 --dims 512 --repeats 5
done
# Metrix MS with classes of 128 rows: Triton cuts them into blocks of 16 (twenty-seventh
# session), CUDA has no class limit
bench gpu_metrix_ms_big_classes_float32 --loss metrix_ms_big_classes --impls triton,cuda,clean --sizes 8192 --dims 512 --repeats 3
# the losses new to the GPU engines in the seventh session (none has run on a GPU yet)
for loss in generalized_lifted npairs; do
  bench "gpu_${loss}_float32" --loss $loss --impls triton,cuda,floor,pml --sizes 8192 --dims 512 --repeats 10
done
bench gpu_lifted_float32 --loss lifted --impls triton,floor,pml --sizes 8192 --dims 512 --repeats 10
# miner= on the Triton and CUDA engines: PML's miner + loss against the mined ops and the clean loss
for loss in ms_miner triplet_semihard; do
  bench "gpu_${loss}_float32" --loss $loss --impls triton,cuda,clean,pml --sizes 8192 --dims 512 --repeats 5
done
# the L2 of unnormalised rows (Triton only: the triplets' `raw` kernels, forty-fifth session;
# the pair losses' RAW kernels, forty-sixth; PML's LiftedStructure runs out of memory at 8192)
for loss in triplet_batch_hard_raw triplet_raw contrastive_raw generalized_lifted_raw; do
  bench "gpu_${loss}_float32" --loss $loss --impls triton,floor,pml --sizes 8192 --dims 512 --repeats 5
done
bench gpu_lifted_raw_float32 --loss lifted_raw --impls triton,floor --sizes 8192 --dims 512 --repeats 5
# EE-HPHN (n = 8) on the Triton and CUDA engines: brute-force mining over all (B + 8·#pairs)² point pairs
bench gpu_ee_hphn_float32 --loss ee_hphn --impls triton,cuda,clean,pml --sizes 2048,8192 --dims 512 --repeats 3
# EE-MS (n = 2) on the Triton engine (eighth session: triton/ee_neg_lse.py) and the CUDA one
# (twenty-fourth: csrc/cuda/ee_losses_cuda.cu), against clean MS
bench gpu_ee_ms_float32 --loss ee_ms --impls triton,cuda,clean,pml --sizes 2048,8192 --dims 512 --repeats 3
# ninth session: TripletMarginLoss with EE (triton/ee_triplet.py), EE-HPHN on the official
# pairing, and Metrix pos_pos (class blocks beside the engine's clean op)
bench gpu_ee_triplet_float32 --loss ee_triplet --impls triton,cuda,clean --sizes 2048,8192 --dims 512 --repeats 3
bench gpu_ee_hphn_adjacent_float32 --loss ee_hphn_adjacent --impls triton,cuda,clean,pml --sizes 8192 --dims 512 --repeats 3
bench gpu_metrix_ms_pos_pos_float32 --loss metrix_ms_pos_pos --impls triton,clean,pml --sizes 8192 --dims 512 --repeats 5
# Metrix against ref_emb: triton's mixed term in checkpointed anchor chunks
# (fused/metrix_refs.py), cuda's from the CUDA refs ops (twenty-fifth session)
bench gpu_metrix_ms_refs_float32 --loss metrix_ms_refs --impls triton,cuda,clean,pml --sizes 2048,8192 --dims 512 --repeats 3
bench gpu_ms_bfloat16 --loss multi_similarity --dtype bfloat16 --impls triton,cuda,pml,floor --sizes 8192 --dims 512,128 --repeats 10
bench gpu_ms_large_bfloat16 --loss multi_similarity --dtype bfloat16 --impls triton,cuda,floor --sizes 32768,65536 --dims 512 --repeats 3
for loss in contrastive proxy_anchor ntxent triplet; do
  bench "gpu_${loss}_bfloat16" --loss $loss --dtype bfloat16 --impls triton,cuda,floor,pml --sizes 8192 --dims 512 --repeats 10
done
limited 60 python3 benchmarks/bench_row_stats.py --device cuda --sizes 8192,32768,65536 --dims 128,512 \
  --dtypes float32,bfloat16 --out "$RES/row_stats_gpu.json" 2>&1 | tail -8
pack "all done"
