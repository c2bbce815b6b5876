// The CUDA engine of the fused pair losses whose loss is a function of per-anchor row
// statistics (multi-similarity, contrastive, ...): S = x rᵀ streamed in chunks of r, each
// chunk's product through cuBLAS (at::mm: tensor cores, TF32 where PyTorch allows it), then
//   forward:  one block per row folds the chunk's pairs into the row's state (a loss-given
//             struct: log-sum-exps, sums, counts) held in device memory between chunks;
//   backward: the chunk is recomputed and overwritten in place by G = ∂L/∂S, one thread per
//             entry, then dx += G r_c and dr_c = Gᵀ x (cuBLAS again).
// The per-pair math is the loss's shared host/device header (common/*.h), the same code the
// CPU ops run and the CPU tests check. Peak extra memory: one B×chunk tile.
//
// A Loss provides:
//   struct State { static MO_HD State empty(); MO_HD void merge(const State&); }  (POD)
//   __device__ void fold(State&, T s, bool positive, int64_t row) const
//   __device__ T grad(T s, bool positive, int64_t row) const
// Why recompute rather than keep G from the forward: keeping it is the B×M matrix this
// engine exists to avoid; the recomputation is one chunk product per chunk (4 products in
// all against the floor's 3).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {
namespace cuda_pairs {

constexpr int kThreads = 256;

// 1: positive pair, 0: negative pair, -1: the excluded self pair
__device__ __forceinline__ int pair_kind(const int64_t* __restrict__ yr,
                                         const int64_t* __restrict__ yc, int64_t i, int64_t gj,
                                         bool exclude_diag) {
  if (exclude_diag && gj == i) return -1;
  return yr[i] == yc[gj] ? 1 : 0;
}

// Strided columns (a warp reads consecutive entries: coalesced), per-thread states merged by
// a fixed shared-memory tree, so the result does not depend on scheduling.
template <class Loss, typename T>
__global__ void fold_rows_kernel(const T* __restrict__ s, int64_t len, int64_t start,
                                 const int64_t* __restrict__ yr, const int64_t* __restrict__ yc,
                                 bool exclude_diag, Loss loss, typename Loss::State* state) {
  using State = typename Loss::State;
  const int64_t i = blockIdx.x;
  const T* row = s + i * len;
  State local = State::empty();
  for (int64_t j = threadIdx.x; j < len; j += kThreads) {
    const int kind = pair_kind(yr, yc, i, start + j, exclude_diag);
    if (kind >= 0) loss.fold(local, row[j], kind == 1, i);
  }
  __shared__ State shared[kThreads];
  shared[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x].merge(shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) state[i].merge(shared[0]);
}

template <class Loss, typename T>
__global__ void grad_entries_kernel(T* __restrict__ s, int64_t rows, int64_t len, int64_t start,
                                    const int64_t* __restrict__ yr,
                                    const int64_t* __restrict__ yc, bool exclude_diag,
                                    Loss loss) {
  const int64_t n = rows * len;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n;
       k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = k / len;
    const int kind = pair_kind(yr, yc, i, start + k % len, exclude_diag);
    s[k] = kind < 0 ? T(0) : loss.grad(s[k], kind == 1, i);
  }
}

template <class State>
__global__ void init_states_kernel(State* state, int64_t n, State init) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) state[i] = init;
}

inline int blocks_for(int64_t n) {
  return (int)std::min<int64_t>((n + kThreads - 1) / kThreads, 65535);
}

// The rows' states in device memory (a byte tensor keeps the allocation with the caching
// allocator), every one set to `init`.
template <class State>
at::Tensor make_states(int64_t n, const State& init, const at::TensorOptions& opts) {
  at::Tensor buf = at::empty({std::max<int64_t>(n, 1) * (int64_t)sizeof(State)},
                             opts.dtype(at::kByte));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    init_states_kernel<State><<<(int)((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<State*>(buf.data_ptr()), n, init);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return buf;
}

// Forward: fold every chunk of S = x rᵀ into the rows' states.
template <class Loss, typename T>
void fold_all(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
              const at::Tensor& ref_labels, bool exclude_diag, int64_t chunk, const Loss& loss,
              typename Loss::State* state) {
  const int64_t B = x.size(0), M = r.size(0);
  if (B == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t len = std::min(chunk, M - start);
    at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
    fold_rows_kernel<Loss, T><<<(unsigned)B, kThreads, 0, stream>>>(
        s.data_ptr<T>(), len, start, labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(),
        exclude_diag, loss, state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Backward: (dx, dr) from each recomputed chunk turned into its G block; dr stays zero
// unless need_dr (the Gᵀ x products are a third of the work).
template <class Loss, typename T>
std::tuple<at::Tensor, at::Tensor> grad_all(const at::Tensor& x, const at::Tensor& r,
                                            const at::Tensor& labels,
                                            const at::Tensor& ref_labels, bool exclude_diag,
                                            int64_t chunk, const Loss& loss,
                                            bool need_dr = true) {
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  if (B == 0) return {dx, dr};
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t len = std::min(chunk, M - start);
    at::Tensor rc = r.narrow(0, start, len);
    at::Tensor s = at::mm(x, rc.t()).contiguous();  // becomes G in place
    grad_entries_kernel<Loss, T><<<blocks_for(B * len), kThreads, 0, stream>>>(
        s.data_ptr<T>(), B, len, start, labels.data_ptr<int64_t>(),
        ref_labels.data_ptr<int64_t>(), exclude_diag, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dx.addmm_(s, rc);
    if (need_dr) dr.narrow(0, start, len).addmm_(s.t(), x);
  }
  return {dx, dr};
}

}  // namespace cuda_pairs
}  // namespace metrix_ops
