// Similarities of listed pairs on the CUDA engine, the schemas of csrc/cpu/pair_sims_cpu.cpp:
// s_k = x[rows_k] · r[cols_k] for the P pairs of an indices_tuple, without the B×M matrix and
// without a P×D gather. With them every loss's indices_tuple path (fused/indices/: PML's
// per-pair terms and scatter reductions in PyTorch on these P values) runs on CUDA tensors.
//
// Forward: a warp per pair, lanes over the features, a shuffle sum in the accumulation type.
// Backward: dx[i] = Σ_{k: rows_k = i} g_k r[cols_k], dr[j] = Σ_{k: cols_k = j} g_k x[rows_k].
// As the CPU op, deterministic without atomics: the pairs are bucketed by output row (a
// stable sort and the buckets' offsets, O(P + B)), and a warp per output row sums its own
// pairs in their listed order, lanes over the features.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "common/checks.h"

namespace metrix_ops {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

unsigned warp_blocks(int64_t n) { return (unsigned)((n + kWarps - 1) / kWarps); }

template <typename T>
__global__ void pair_sims_kernel(const T* __restrict__ x, const T* __restrict__ r,
                                 const int64_t* __restrict__ rows,
                                 const int64_t* __restrict__ cols, int64_t P, int64_t D,
                                 T* __restrict__ out) {
  const int64_t k = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= P) return;  // the whole warp
  const T* a = x + rows[k] * D;
  const T* b = r + cols[k] * D;
  acc_t<T> s = 0;
  for (int64_t d = lane; d < D; d += 32) s += acc_t<T>(a[d]) * acc_t<T>(b[d]);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) out[k] = T(s);
}

// Output row i (a warp): out[i] = Σ over its bucket's pairs e (in order) of g[e]·src[other[e]]
template <typename T>
__global__ void bucket_sum_kernel(const T* __restrict__ src, const int64_t* __restrict__ order,
                                  const int64_t* __restrict__ start,
                                  const int64_t* __restrict__ other, const T* __restrict__ g,
                                  int64_t n_out, int64_t D, T* __restrict__ out) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= n_out) return;
  const int64_t e0 = start[i], e1 = start[i + 1];
  for (int64_t d = lane; d < D; d += 32) {
    acc_t<T> acc = 0;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t k = order[e];
      acc += acc_t<T>(g[k]) * acc_t<T>(src[other[k] * D + d]);
    }
    out[i * D + d] = T(acc);
  }
}

// dst (n_out × D): each row's bucket of pairs (those whose `key` is the row) summed
template <typename T>
void scatter_rows(const at::Tensor& key, const at::Tensor& other, const at::Tensor& g,
                  const at::Tensor& src, at::Tensor& dst) {
  const int64_t n_out = dst.size(0), D = dst.size(1);
  if (n_out == 0 || D == 0) return;
  // the pairs in key order, ties in listed order (stable), and each bucket's first position
  // (a lower bound per row: no atomics, allowed under torch's deterministic mode)
  const auto sorted = key.sort(/*stable=*/true, 0, false);
  const at::Tensor& order = std::get<1>(sorted);
  const at::Tensor start =
      at::searchsorted(std::get<0>(sorted), at::arange(n_out + 1, key.options()));
  bucket_sum_kernel<T><<<warp_blocks(n_out), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src.data_ptr<T>(), order.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
      other.data_ptr<int64_t>(), g.data_ptr<T>(), n_out, D, dst.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

at::Tensor pair_sims_fwd_cuda(const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& rows_,
                              const at::Tensor& cols_) {
  check_pair_sims_inputs(x_, r_, rows_, cols_);
  check_cuda(x_);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous(), rows = rows_.contiguous(), cols = cols_.contiguous();
  const int64_t P = rows.size(0);
  at::Tensor out = at::empty({P}, x.options());
  if (P == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_sims_fwd_cuda", [&] {
    pair_sims_kernel<scalar_t><<<warp_blocks(P), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
        cols.data_ptr<int64_t>(), P, x.size(1), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_sims_bwd_cuda(const at::Tensor& grad_,
                                                      const at::Tensor& x_, const at::Tensor& r_,
                                                      const at::Tensor& rows_,
                                                      const at::Tensor& cols_) {
  check_pair_sims_inputs(x_, r_, rows_, cols_);
  check_cuda(x_);
  TORCH_CHECK(grad_.dim() == 1 && grad_.size(0) == rows_.size(0), "grad must be 1-D of length ",
              rows_.size(0), ", got ", grad_.sizes());
  TORCH_CHECK(grad_.device() == x_.device(), "grad must be on ", x_.device(), ", got ",
              grad_.device());
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous(), rows = rows_.contiguous(), cols = cols_.contiguous();
  auto g = grad_.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  if (rows.size(0) == 0) return {dx, dr};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_sims_bwd_cuda", [&] {
    scatter_rows<scalar_t>(rows, cols, g, r, dx);
    scatter_rows<scalar_t>(cols, rows, g, x, dr);
  });
  return {dx, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("pair_sims_fwd", &pair_sims_fwd_cuda);
  m.impl("pair_sims_bwd", &pair_sims_bwd_cuda);
}

}  // namespace metrix_ops
