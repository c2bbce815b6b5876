// The CUDA engine of the fused pair losses whose loss is a function of per-anchor row
// statistics (multi-similarity, contrastive, ...): S = x rᵀ streamed in chunks of r, each
// chunk's product through cuBLAS (at::mm: tensor cores, TF32 where PyTorch allows it), then
//   forward:  one warp (or block) per row folds the chunk's pairs into the row's state (a loss-given
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
// (or fold_at / grad_at, which take the reference index too: below).
// Why recompute rather than keep G from the forward: keeping it is the B×M matrix this
// engine exists to avoid; the recomputation is one chunk product per chunk (4 products in
// all against the floor's 3).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "common/checks.h"
#include "common/row_state.h"  // MO_HD

namespace metrix_ops {
namespace cuda_pairs {

// The state of a loss that keeps one online log-sum-exp per side of a row (positives,
// negatives): MS, Circle, GeneralizedLifted, and ProxyAnchor's per-proxy terms.
template <typename T>
struct TwoSideLse {
  OnlineLse<T> pos, neg;
  MO_HD static TwoSideLse empty() { return {OnlineLse<T>::empty(), OnlineLse<T>::empty()}; }
  MO_HD void merge(const TwoSideLse& o) {
    pos.merge(o.pos);
    neg.merge(o.neg);
  }
};

// The state of a loss that keeps per row the sum and count of its kept terms on each side
// (contrastive, clean and mixed): fp64 sums, as the CPU ops (B·M terms would lose digits in
// fp32).
struct SideSums {
  double pos_sum, neg_sum;
  long long pos_cnt, neg_cnt;
  MO_HD static SideSums empty() { return {0.0, 0.0, 0, 0}; }
  MO_HD void merge(const SideSums& o) {
    pos_sum += o.pos_sum;
    neg_sum += o.neg_sum;
    pos_cnt += o.pos_cnt;
    neg_cnt += o.neg_cnt;
  }
};

// The pair ops' input checks (common/checks.h), and that x lives on a CUDA device.
inline void check_cuda_pair_call(const at::Tensor& x, const at::Tensor& r,
                                 const at::Tensor& labels, const at::Tensor& ref_labels,
                                 int64_t chunk) {
  check_pair_op_inputs(x, r, labels, ref_labels, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

constexpr int kThreads = 256;

// 1: positive pair, 0: negative pair, -1: the excluded self pair (yi: row i's label)
__device__ __forceinline__ int pair_kind(int64_t yi, const int64_t* __restrict__ yc, int64_t i,
                                         int64_t gj, bool exclude_diag) {
  if (exclude_diag && gj == i) return -1;
  return yc[gj] == yi ? 1 : 0;
}

// A POD state moved down the warp by `off` lanes, 32-bit word by word.
template <class State>
__device__ __forceinline__ State shfl_down_state(const State& v, int off) {
  static_assert(std::is_trivially_copyable<State>::value, "State must be POD");
  static_assert(sizeof(State) % sizeof(int) == 0, "State must be whole 32-bit words");
  constexpr int kWords = sizeof(State) / sizeof(int);
  int w[kWords];
  memcpy(w, &v, sizeof(State));
#pragma unroll
  for (int k = 0; k < kWords; ++k) w[k] = __shfl_down_sync(0xffffffffu, w[k], off);
  State out;
  memcpy(&out, w, sizeof(State));
  return out;
}

// kRowWarps warps per row (1, or kThreads / 32 for one block per row), lanes taking strided
// columns (a warp reads consecutive entries: coalesced). The states merge by a fixed tree:
// A Loss may instead take the entry's reference index too, fold_at(State&, s, positive, row,
// ref) and grad_at(s, positive, row, ref) (ProxyAnchor's per-example weights); the others
// see the row only.
template <class L, class = void>
struct TakesRef : std::false_type {};
template <class L>
struct TakesRef<L, std::void_t<decltype(&L::fold_at)>> : std::true_type {};

template <class Loss, class State, typename T>
__device__ __forceinline__ void fold_entry(const Loss& loss, State& st, T s, bool pos,
                                           int64_t row, int64_t ref) {
  if constexpr (TakesRef<Loss>::value) loss.fold_at(st, s, pos, row, ref);
  else loss.fold(st, s, pos, row);
}

template <class Loss, typename T>
__device__ __forceinline__ T grad_entry(const Loss& loss, T s, bool pos, int64_t row,
                                        int64_t ref) {
  if constexpr (TakesRef<Loss>::value) return loss.grad_at(s, pos, row, ref);
  else return loss.grad(s, pos, row);
}

// lane l takes lane l + 16, + 8, ..., + 1 (shuffles), then the row's warps in order, so the
// result does not depend on scheduling. One warp per row when there are rows enough to fill
// the GPU: no shared memory or block barrier, and 32× the columns per reduction; a block per
// row when there are few (ProxyAnchor's C proxies as rows).
template <class Loss, typename T, int kRowWarps>
__global__ void fold_rows_kernel(const T* __restrict__ s, int64_t rows, int64_t len,
                                 int64_t start, const int64_t* __restrict__ yr,
                                 const int64_t* __restrict__ yc, bool exclude_diag, Loss loss,
                                 typename Loss::State* state) {
  using State = typename Loss::State;
  constexpr int kRowThreads = 32 * kRowWarps, kRowsPerBlock = kThreads / kRowThreads;
  static_assert(kThreads % kRowThreads == 0, "a block holds whole rows");
  const int t = threadIdx.x % kRowThreads, lane = threadIdx.x % 32;
  const int64_t i = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / kRowThreads;
  State local = State::empty();
  if (i < rows) {
    const T* row = s + i * len;
    const int64_t yi = yr[i];
    for (int64_t j = t; j < len; j += kRowThreads) {
      const int kind = pair_kind(yi, yc, i, start + j, exclude_diag);
      if (kind >= 0) fold_entry(loss, local, row[j], kind == 1, i, start + j);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {  // every lane shuffles (full mask)
    const State other = shfl_down_state(local, off);
    if (lane < off) local.merge(other);
  }
  if constexpr (kRowWarps == 1) {
    if (lane == 0 && i < rows) state[i].merge(local);
  } else {
    __shared__ State partial[kThreads / 32];
    if (lane == 0) partial[threadIdx.x / 32] = local;
    __syncthreads();
    if (t == 0 && i < rows) {
      const int w0 = (threadIdx.x / 32);
      State acc = partial[w0];
      for (int w = 1; w < kRowWarps; ++w) acc.merge(partial[w0 + w]);
      state[i].merge(acc);
    }
  }
}

// G in place: grid.y over rows (strided), grid.x over the chunk's columns; row and column
// come from the grid, not from dividing a flat index (64-bit division costs ~100 instructions
// per entry on the GPU).
template <class Loss, typename T>
__global__ void grad_entries_kernel(T* __restrict__ s, int64_t rows, int64_t len, int64_t start,
                                    const int64_t* __restrict__ yr,
                                    const int64_t* __restrict__ yc, bool exclude_diag,
                                    Loss loss) {
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    T* row = s + i * len;
    const int64_t yi = yr[i];
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < len;
         j += (int64_t)gridDim.x * blockDim.x) {
      const int kind = pair_kind(yi, yc, i, start + j, exclude_diag);
      row[j] = kind < 0 ? T(0) : grad_entry(loss, row[j], kind == 1, i, start + j);
    }
  }
}

template <class State>
__global__ void init_states_kernel(State* state, int64_t n, State init) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) state[i] = init;
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
  // a warp per row once the rows give every multiprocessor 32 warps or more
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool warp_rows = B >= 32 * (int64_t)sms;
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t len = std::min(chunk, M - start);
    at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
    const T* sp = s.data_ptr<T>();
    const int64_t* yr = labels.data_ptr<int64_t>();
    const int64_t* yc = ref_labels.data_ptr<int64_t>();
    if (warp_rows) {
      fold_rows_kernel<Loss, T, 1><<<(unsigned)((B + kThreads / 32 - 1) / (kThreads / 32)),
                                     kThreads, 0, stream>>>(sp, B, len, start, yr, yc,
                                                            exclude_diag, loss, state);
    } else {
      fold_rows_kernel<Loss, T, kThreads / 32><<<(unsigned)B, kThreads, 0, stream>>>(
          sp, B, len, start, yr, yc, exclude_diag, loss, state);
    }
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
    const dim3 grid((unsigned)((len + kThreads - 1) / kThreads),
                    (unsigned)std::min<int64_t>(B, 65535));
    grad_entries_kernel<Loss, T><<<grid, kThreads, 0, stream>>>(
        s.data_ptr<T>(), B, len, start, labels.data_ptr<int64_t>(),
        ref_labels.data_ptr<int64_t>(), exclude_diag, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dx.addmm_(s, rc);
    if (need_dr) dr.narrow(0, start, len).addmm_(s.t(), x);
  }
  return {dx, dr};
}

// The op entry points of a loss with a TwoSideLse row state (Circle, GeneralizedLifted): the
// checks, the device guard, contiguous inputs, the dtype dispatch, then fold_all and a
// finish kernel (rows[i] = loss.finish(lse⁺_i, lse⁻_i), the two log-sum-exps kept for the
// backward), or grad_all. make_loss(g, lse⁺, lse⁻) builds the loss for one dtype from the
// backward's per-row pointers (const T*; all null for the forward), so one lambda serves both.
template <class Loss, typename T>
__global__ void two_side_finish_kernel(const TwoSideLse<T>* state, int64_t n, Loss loss,
                                       T* rows, T* lse_pos, T* lse_neg) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T lp = state[i].pos.value(), ln = state[i].neg.value();  // −inf for an empty side
  lse_pos[i] = lp;
  lse_neg[i] = ln;
  rows[i] = loss.finish(lp, ln);
}

template <class MakeLoss>
std::tuple<at::Tensor, at::Tensor, at::Tensor> two_side_fwd(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, int64_t chunk, MakeLoss make_loss) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor rows = at::empty({B}, x.options()), lp = at::empty_like(rows),
             ln = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_side_fwd_cuda", [&] {
    using T = scalar_t;
    const T* none = nullptr;
    const auto loss = make_loss(none, none, none);
    using Loss = std::remove_cv_t<decltype(loss)>;
    at::Tensor buf = make_states(B, TwoSideLse<T>::empty(), x.options());
    auto* state = reinterpret_cast<TwoSideLse<T>*>(buf.data_ptr());
    fold_all<Loss, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, state);
    if (B > 0) {
      two_side_finish_kernel<Loss, T><<<(int)((B + kThreads - 1) / kThreads), kThreads, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
          state, B, loss, rows.data_ptr<T>(), lp.data_ptr<T>(), ln.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, lp, ln};
}

template <class MakeLoss>
std::tuple<at::Tensor, at::Tensor> two_side_bwd(
    const at::Tensor& grad_rows, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, int64_t chunk, bool need_dr,
    MakeLoss make_loss) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  check_row_vec(grad_rows, x_, "grad_rows");
  check_row_vec(lse_pos_, x_, "lse_pos");
  check_row_vec(lse_neg_, x_, "lse_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows.to(x.scalar_type()).contiguous();
  auto lp = lse_pos_.to(x.scalar_type()).contiguous();
  auto ln = lse_neg_.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_side_bwd_cuda", [&] {
    using T = scalar_t;
    const T *gp = g.data_ptr<T>(), *lpp = lp.data_ptr<T>(), *lnp = ln.data_ptr<T>();
    const auto loss = make_loss(gp, lpp, lnp);
    using Loss = std::remove_cv_t<decltype(loss)>;
    out = grad_all<Loss, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, need_dr);
  });
  return out;
}

}  // namespace cuda_pairs
}  // namespace metrix_ops
