// ee_hphn_mine for CUDA tensors (the schema of csrc/cpu/ee_mining_cpu.cpp, so the Python glue,
// fused/hphn_triplet.py, serves both devices), for the clean HPHN triplet (batch hard): per
// anchor its farthest positive (smallest s) and closest negative (largest s), ties to the
// lowest column as the reference's argmin/argmax. The CPU op's Embedding Expansion search
// (segments, synthetic points) is not here: with segments it raises, and EE on CUDA tensors
// runs on the Triton engine (triton/ee_hphn.py).
//
// S = x xᵀ streamed in chunks of rows through cuBLAS (at::mm); a warp per row keeps both
// picks over its strided columns and the warp merges them by shuffles. Every merge keeps the
// smaller column on equal values, so the picks do not depend on which lane saw a column
// first. Memory: one chunk × B block.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"

namespace metrix_ops {

namespace {

constexpr int kWarps = 8;  // rows (one warp each) per block
constexpr int kThreads = 32 * kWarps;

// A running pick: value and column (−1: none yet). Better: a column where there was none, a
// value strictly better, or an equal value at a smaller column.
template <typename T, bool kMin>
__device__ __forceinline__ void take(T& v, int64_t& c, T ov, int64_t oc) {
  if (oc < 0) return;
  const bool better = kMin ? ov < v : ov > v;
  if (c < 0 || better || (ov == v && oc < c)) v = ov, c = oc;
}

template <typename T, bool kMin>
__device__ __forceinline__ void warp_take(T& v, int64_t& c) {
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int64_t oc = __shfl_xor_sync(0xffffffffu, c, off);
    take<T, kMin>(v, c, ov, oc);
  }
}

// Rows [start, start + len) of the batch: s is their len × B block of S, whole rows, so the
// entries of a row all come from one product (duplicated rows tie bit for bit).
template <typename T>
__global__ void pick_rows_kernel(const T* __restrict__ s, int64_t len, int64_t B, int64_t start,
                                 const int64_t* __restrict__ labels, int64_t* __restrict__ pcol,
                                 int64_t* __restrict__ ncol) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= len) return;  // the whole warp: i is the warp's
  const int64_t gi = start + i, li = labels[gi];
  const T* row = s + i * B;
  T pv = T(0), nv = T(0);
  int64_t pc = -1, nc = -1;
  for (int64_t j = lane; j < B; j += 32) {
    if (j == gi) continue;  // the self pair
    if (labels[j] == li) take<T, true>(pv, pc, row[j], j);
    else take<T, false>(nv, nc, row[j], j);
  }
  warp_take<T, true>(pv, pc);
  warp_take<T, false>(nv, nc);
  if (lane == 0) pcol[gi] = pc, ncol[gi] = nc;
}

}  // namespace

at::Tensor ee_hphn_mine_cuda(const at::Tensor& x_, const at::Tensor& labels_,
                             const at::Tensor& seg_i, const at::Tensor& seg_j, int64_t n,
                             int64_t chunk) {
  TORCH_CHECK(x_.dim() == 2, "x must be 2-D (rows, D), got ", x_.dim(), "-D");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble,
              "x must be float32 or float64 (half inputs are upcast before the op), got ",
              x_.scalar_type());
  TORCH_CHECK(labels_.dim() == 1 && labels_.size(0) == x_.size(0) &&
                  labels_.scalar_type() == at::kLong,
              "labels must be int64 of shape (", x_.size(0), ",)");
  TORCH_CHECK(x_.is_cuda() && labels_.device() == x_.device(),
              "ee_hphn_mine: x and labels must be on one CUDA device, got ", x_.device(), " and ",
              labels_.device());
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
  TORCH_CHECK(n >= 0, "n_points must be >= 0, got ", n);
  TORCH_CHECK(seg_i.dim() == 1 && seg_j.dim() == 1 && seg_i.size(0) == seg_j.size(0),
              "seg_i and seg_j must be of the same shape (S,)");
  TORCH_CHECK(n == 0 || seg_i.size(0) == 0,
              "ee_hphn_mine on CUDA tensors mines the clean loss only (n_points = 0 or no "
              "segments); Embedding Expansion on CUDA tensors runs on the Triton engine "
              "(backend='triton')");
  if (seg_i.size(0) > 0) {  // no points on them, but checked as the CPU op checks them
    TORCH_CHECK(seg_i.scalar_type() == at::kLong && seg_j.scalar_type() == at::kLong,
                "seg_i and seg_j must be int64");
    const at::Tensor si = seg_i.to(labels_.device()), sj = seg_j.to(labels_.device());
    const int64_t B = x_.size(0);
    TORCH_CHECK(((si >= 0) & (si < B) & (sj >= 0) & (sj < B) & (si != sj)).all().item<bool>(),
                "seg_i/seg_j: every segment must join two distinct rows in [0, ", B, ")");
    TORCH_CHECK(labels_.index_select(0, si).eq(labels_.index_select(0, sj)).all().item<bool>(),
                "seg_i/seg_j: a segment joins rows of different labels; segments are positive "
                "pairs");
  }
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto labels = labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor out = at::full({B, 7}, -1, labels.options());
  if (B == 0) return out;
  at::Tensor pcol = at::empty({B}, labels.options()), ncol = at::empty({B}, labels.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_hphn_mine_cuda", [&] {
    using T = scalar_t;
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      const at::Tensor s = at::mm(x.narrow(0, start, len), x.t()).contiguous();
      pick_rows_kernel<T><<<(unsigned)((len + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, B, start, labels.data_ptr<int64_t>(), pcol.data_ptr<int64_t>(),
          ncol.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // [p, a_u, a_w, a_k, q_u, q_w, q_k]: originals are (i, i, n + 1); −1 without a negative
  const at::Tensor has_neg = ncol.ge(0);
  const at::Tensor none = at::full({B}, -1, labels.options());
  const at::Tensor self = at::where(has_neg, at::arange(B, labels.options()), none);
  const at::Tensor k = at::where(has_neg, at::full({B}, n + 1, labels.options()), none);
  return at::stack({pcol, self, self, k, ncol, ncol, k}, 1);
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) { m.impl("ee_hphn_mine", &ee_hphn_mine_cuda); }

}  // namespace metrix_ops
