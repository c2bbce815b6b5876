// CUDA implementations of the multi-similarity ops with PML's MultiSimilarityMiner inside
// (the schemas of csrc/cpu/ms_loss_cpu.cpp's ms_mine_bounds and ms_mined_fwd/bwd, so the
// Python glue, fused/multi_similarity.py's miner_impl, serves both devices), on the row-chunk
// engine of cuda/pair_rows.cuh: a first streaming pass for each anchor's hardest negative
// (largest s) and hardest positive (smallest s), then MS over the pairs the miner keeps
// (common/lse_acc.h: ms_miner_keeps), with each anchor's kept pair counts.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/lse_acc.h"
#include "cuda/pair_rows.cuh"

namespace metrix_ops {

namespace {

using cuda_pairs::kThreads;

int launch_blocks(int64_t n) { return (int)((n + kThreads - 1) / kThreads); }

// ---- pass 1: the anchors' hardest pairs

template <typename T>
struct Extremes {
  T hn, hp;  // largest negative s (−inf: none), smallest positive s (+inf: none)
  MO_HD static Extremes empty() {
    return {-std::numeric_limits<T>::infinity(), std::numeric_limits<T>::infinity()};
  }
  MO_HD void merge(const Extremes& o) {
    hn = o.hn > hn ? o.hn : hn;
    hp = o.hp < hp ? o.hp : hp;
  }
};

template <typename T>
struct BoundsRows {
  using State = Extremes<T>;
  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    if (pos) st.hp = s < st.hp ? s : st.hp;
    else st.hn = s > st.hn ? s : st.hn;
  }
};

template <typename T>
__global__ void bounds_finish_kernel(const Extremes<T>* state, int64_t n, T* hn, T* hp) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) hn[i] = state[i].hn, hp[i] = state[i].hp;
}

// self_block: fold_all's (> 0: the self op's symmetric blocks; 0 for the op's own call)
std::tuple<at::Tensor, at::Tensor> mine_bounds(const at::Tensor& x_, const at::Tensor& r_,
                                               const at::Tensor& labels_,
                                               const at::Tensor& ref_labels_, bool exclude_diag,
                                               int64_t chunk, int64_t self_block) {
  cuda_pairs::check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor hn = at::empty({B}, x.options()), hp = at::empty_like(hn);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mine_bounds_cuda", [&] {
    using T = scalar_t;
    at::Tensor buf = cuda_pairs::make_states(B, Extremes<T>::empty(), x.options());
    auto* state = reinterpret_cast<Extremes<T>*>(buf.data_ptr());
    cuda_pairs::fold_all<BoundsRows<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk,
                                           BoundsRows<T>{}, state, self_block);
    if (B > 0) {
      bounds_finish_kernel<T><<<launch_blocks(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          state, B, hn.data_ptr<T>(), hp.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {hn, hp};
}

std::tuple<at::Tensor, at::Tensor> ms_mine_bounds_cuda(const at::Tensor& x, const at::Tensor& r,
                                                       const at::Tensor& labels,
                                                       const at::Tensor& ref_labels,
                                                       bool exclude_diag, int64_t chunk) {
  return mine_bounds(x, r, labels, ref_labels, exclude_diag, chunk, 0);
}

// ---- pass 2: MS over the kept pairs

template <typename T>
struct MinedState {
  OnlineLse<T> pos, neg;
  long long kept_pos, kept_neg;
  // the identity of merge (every lane of the fold starts from it); the rows' e^0 term of
  // log(1 + Σ) is their initial state instead (make_states' init)
  MO_HD static MinedState empty() { return {OnlineLse<T>::empty(), OnlineLse<T>::empty(), 0, 0}; }
  MO_HD void merge(const MinedState& o) {
    pos.merge(o.pos);
    neg.merge(o.neg);
    kept_pos += o.kept_pos;
    kept_neg += o.kept_neg;
  }
};

template <typename T>
struct MinedRows {
  using State = MinedState<T>;
  T alpha, beta, base, eps;
  const T* hn;  // the rows' hardest negative and positive (pass 1)
  const T* hp;
  const T* g_rows = nullptr;  // backward: ∂L/∂row and the rows' finished log-sum-exps
  const T* lse_pos = nullptr;
  const T* lse_neg = nullptr;

  __device__ bool keeps(T s, bool pos, int64_t i) const {
    return ms_miner_keeps(s, pos, hn[i], hp[i], eps);
  }
  __device__ void fold(State& st, T s, bool pos, int64_t i) const {
    if (!keeps(s, pos, i)) return;
    if (pos) {
      st.pos.push(ms_pos_arg(s, alpha, base));
      ++st.kept_pos;
    } else {
      st.neg.push(ms_neg_arg(s, beta, base));
      ++st.kept_neg;
    }
  }
  __device__ T grad(T s, bool pos, int64_t i) const {
    if (!keeps(s, pos, i)) return T(0);
    return g_rows[i] * (pos ? ms_pos_grad(s, alpha, base, lse_pos[i])
                            : ms_neg_grad(s, beta, base, lse_neg[i]));
  }
};

template <typename T>
__global__ void mined_finish_kernel(const MinedState<T>* state, int64_t n, T alpha, T beta,
                                    T* rows, T* lse_pos, T* lse_neg, int64_t* kept) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  lse_pos[i] = state[i].pos.value();
  lse_neg[i] = state[i].neg.value();
  rows[i] = lse_pos[i] / alpha + lse_neg[i] / beta;
  kept[2 * i] = state[i].kept_pos;
  kept[2 * i + 1] = state[i].kept_neg;
}

// The thresholds: one per anchor, x's dtype and device
void check_thresholds(const at::Tensor& x, const at::Tensor& hn, const at::Tensor& hp) {
  check_row_vec(hn, x, "hardest_neg");
  check_row_vec(hp, x, "hardest_pos");
  TORCH_CHECK(hn.scalar_type() == x.scalar_type() && hp.scalar_type() == x.scalar_type(),
              "hardest_neg and hardest_pos must have x's dtype ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mined_fwd(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, const at::Tensor& hardest_neg, const at::Tensor& hardest_pos,
    bool exclude_diag, double alpha, double beta, double base, double eps, int64_t chunk,
    int64_t self_block) {
  cuda_pairs::check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  check_thresholds(x_, hardest_neg, hardest_pos);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto hn = hardest_neg.contiguous(), hp = hardest_pos.contiguous();
  const int64_t B = x.size(0);
  at::Tensor rows = at::empty({B}, x.options()), lp = at::empty_like(rows),
             ln = at::empty_like(rows);
  at::Tensor kept = at::zeros({B, 2}, labels.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mined_fwd_cuda", [&] {
    using T = scalar_t;
    const MinedRows<T> loss{T(alpha), T(beta), T(base), T(eps), hn.data_ptr<T>(),
                            hp.data_ptr<T>()};
    const MinedState<T> init{lse_with_one<T>(), lse_with_one<T>(), 0, 0};
    at::Tensor buf = cuda_pairs::make_states(B, init, x.options());
    auto* state = reinterpret_cast<MinedState<T>*>(buf.data_ptr());
    cuda_pairs::fold_all<MinedRows<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss,
                                          state, self_block);
    if (B > 0) {
      mined_finish_kernel<T><<<launch_blocks(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          state, B, T(alpha), T(beta), rows.data_ptr<T>(), lp.data_ptr<T>(), ln.data_ptr<T>(),
          kept.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, lp, ln, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_mined_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& hardest_neg, const at::Tensor& hardest_pos,
    bool exclude_diag, double alpha, double beta, double base, double eps, int64_t chunk) {
  return mined_fwd(x, r, labels, ref_labels, hardest_neg, hardest_pos, exclude_diag, alpha, beta,
                   base, eps, chunk, 0);
}

std::tuple<at::Tensor, at::Tensor> ms_mined_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, const at::Tensor& hardest_neg, const at::Tensor& hardest_pos,
    bool exclude_diag, double alpha, double beta, double base, double eps, int64_t chunk) {
  cuda_pairs::check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  check_thresholds(x_, hardest_neg, hardest_pos);
  check_row_vec(grad_rows, x_, "grad_rows");
  check_row_vec(lse_pos, x_, "lse_pos");
  check_row_vec(lse_neg, x_, "lse_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto hn = hardest_neg.contiguous(), hp = hardest_pos.contiguous();
  auto g = grad_rows.to(x.scalar_type()).contiguous();
  auto lp = lse_pos.to(x.scalar_type()).contiguous(), ln = lse_neg.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mined_bwd_cuda", [&] {
    using T = scalar_t;
    const MinedRows<T> loss{T(alpha), T(beta), T(base), T(eps), hn.data_ptr<T>(),
                            hp.data_ptr<T>(), g.data_ptr<T>(), lp.data_ptr<T>(),
                            ln.data_ptr<T>()};
    out = cuda_pairs::grad_all<MinedRows<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk,
                                                loss);
  });
  return out;
}

// ---- the batch against itself (the schemas of csrc/cpu/ms_mined_self_cpu.cpp): both passes
// and the backward take S's symmetric blocks (cuda_pairs::fold_self, grad_self). The
// miner's rule is per row (row i keeps (i, j) by its own thresholds), so a block's column fold
// and G_ji apply row j's rule to s_ij, as the clean loss's.

std::tuple<at::Tensor, at::Tensor> ms_mine_bounds_self_cuda(const at::Tensor& x,
                                                            const at::Tensor& labels,
                                                            int64_t block) {
  cuda_pairs::check_block(block);
  return mine_bounds(x, x, labels, labels, true, block, block);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_mined_self_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& hardest_neg,
    const at::Tensor& hardest_pos, double alpha, double beta, double base, double eps,
    int64_t block) {
  cuda_pairs::check_block(block);
  return mined_fwd(x, x, labels, labels, hardest_neg, hardest_pos, true, alpha, beta, base, eps,
                   block, block);
}

at::Tensor ms_mined_self_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& x_,
                                  const at::Tensor& labels_, const at::Tensor& lse_pos,
                                  const at::Tensor& lse_neg, const at::Tensor& hardest_neg,
                                  const at::Tensor& hardest_pos, double alpha, double beta,
                                  double base, double eps, int64_t block) {
  cuda_pairs::check_block(block);
  check_thresholds(x_, hardest_neg, hardest_pos);
  auto hn = hardest_neg.contiguous(), hp = hardest_pos.contiguous();
  return cuda_pairs::two_side_self_bwd(grad_rows, x_, labels_, lse_pos, lse_neg, block,
                                       [&](auto g, auto lp, auto ln) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return MinedRows<T>{T(alpha), T(beta), T(base), T(eps), hn.data_ptr<T>(), hp.data_ptr<T>(),
                        g, lp, ln};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("ms_mine_bounds", &ms_mine_bounds_cuda);
  m.impl("ms_mined_fwd", &ms_mined_fwd_cuda);
  m.impl("ms_mined_bwd", &ms_mined_bwd_cuda);
  m.impl("ms_mine_bounds_self", &ms_mine_bounds_self_cuda);
  m.impl("ms_mined_self_fwd", &ms_mined_self_fwd_cuda);
  m.impl("ms_mined_self_bwd", &ms_mined_self_bwd_cuda);
}

}  // namespace metrix_ops
