// CUDA implementations of the fused multi-similarity, contrastive and circle ops (the same
// schemas as csrc/cpu/ms_loss_cpu.cpp, contrastive_cpu.cpp and circle_cpu.cpp, so one Python
// glue serves both devices), on the row-chunk engine of cuda/pair_rows.cuh. Per-pair math:
// common/lse_acc.h (MS), common/contrastive.h, common/circle.h, the headers the CPU ops use.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/circle.h"
#include "common/contrastive.h"
#include "common/lse_acc.h"
#include "cuda/pair_rows.cuh"

namespace metrix_ops {

namespace {

using cuda_pairs::check_cuda_pair_call;
using cuda_pairs::fold_all;
using cuda_pairs::grad_all;
using cuda_pairs::kThreads;
using cuda_pairs::make_states;

// ---- multi-similarity: per row log(1 + Σ_pos e^{−α(s−b)}) and log(1 + Σ_neg e^{β(s−b)})

template <typename T>
struct MsRowLoss {
  using State = cuda_pairs::TwoSideLse<T>;
  T alpha, beta, base;
  const T* g_rows = nullptr;  // backward: ∂L/∂row and the rows' finished log-sum-exps
  const T* lse_pos = nullptr;
  const T* lse_neg = nullptr;

  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    if (pos) st.pos.push(ms_pos_arg(s, alpha, base));
    else st.neg.push(ms_neg_arg(s, beta, base));
  }
  __device__ T grad(T s, bool pos, int64_t i) const {
    return g_rows[i] * (pos ? ms_pos_grad(s, alpha, base, lse_pos[i])
                            : ms_neg_grad(s, beta, base, lse_neg[i]));
  }
};

template <typename T>
__global__ void ms_finish_kernel(const typename MsRowLoss<T>::State* state, int64_t n, T alpha,
                                 T beta, T* rows, T* lse_pos, T* lse_neg) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  lse_pos[i] = state[i].pos.value();
  lse_neg[i] = state[i].neg.value();
  rows[i] = lse_pos[i] / alpha + lse_neg[i] / beta;
}

// self_block: fold_all's (> 0: the self op's symmetric blocks; 0 for the op's own call)
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_rows_fwd(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk, int64_t self_block) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor rows = at::empty({B}, x.options()), lp = at::empty_like(rows),
             ln = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_fwd_cuda", [&] {
    using T = scalar_t;
    using State = typename MsRowLoss<T>::State;
    const MsRowLoss<T> loss{T(alpha), T(beta), T(base)};
    // every row starts from the e^0 term of log(1 + Σ)
    const State init{lse_with_one<T>(), lse_with_one<T>()};
    at::Tensor buf = make_states(B, init, x.options());
    State* state = reinterpret_cast<State*>(buf.data_ptr());
    fold_all<MsRowLoss<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, state,
                              self_block);
    if (B > 0) {
      ms_finish_kernel<T><<<(int)((B + kThreads - 1) / kThreads), kThreads, 0,
                            c10::cuda::getCurrentCUDAStream()>>>(
          state, B, T(alpha), T(beta), rows.data_ptr<T>(), lp.data_ptr<T>(), ln.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, lp, ln};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_loss_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  return ms_rows_fwd(x, r, labels, ref_labels, exclude_diag, alpha, beta, base, chunk, 0);
}

// The batch against itself (the schemas of ms_loss_self_fwd/bwd, csrc/metrix_ops.cpp): S's
// symmetric blocks (cuda_pairs::fold_self, grad_self: 2 + 1/nb products for nb block rows
// where the general op with r = x takes 4).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_loss_self_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, double alpha, double beta, double base,
    int64_t block) {
  cuda_pairs::check_block(block);
  return ms_rows_fwd(x, x, labels, labels, true, alpha, beta, base, block, block);
}

at::Tensor ms_loss_self_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                 const at::Tensor& labels, const at::Tensor& lse_pos,
                                 const at::Tensor& lse_neg, double alpha, double beta,
                                 double base, int64_t block) {
  return cuda_pairs::two_side_self_bwd(grad_rows, x, labels, lse_pos, lse_neg, block,
                                       [&](auto g, auto lp, auto ln) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return MsRowLoss<T>{T(alpha), T(beta), T(base), g, lp, ln};
  });
}

std::tuple<at::Tensor, at::Tensor> ms_loss_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  check_row_vec(grad_rows, x_, "grad_rows");
  check_row_vec(lse_pos_, x_, "lse_pos");
  check_row_vec(lse_neg_, x_, "lse_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows.to(x.scalar_type()).contiguous();
  auto lp = lse_pos_.to(x.scalar_type()).contiguous(), ln = lse_neg_.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_bwd_cuda", [&] {
    using T = scalar_t;
    const MsRowLoss<T> loss{T(alpha), T(beta), T(base), g.data_ptr<T>(), lp.data_ptr<T>(),
                            ln.data_ptr<T>()};
    out = grad_all<MsRowLoss<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss);
  });
  return out;
}

// ---- contrastive: per row the sum and count of the kept hinge terms of each side

using ConState = cuda_pairs::SideSums;

template <typename T>
struct ConRowLoss {
  using State = ConState;
  bool cosine;
  T pos_margin, neg_margin, low, high;  // low/high: the reducer's window on a term
  const T* g_pos = nullptr;             // backward: ∂L/∂(each row's sums)
  const T* g_neg = nullptr;

  __device__ PairTerm<T> term(T s, bool pos) const {
    return contrastive_term(s, cosine, pos, pos ? pos_margin : neg_margin);
  }
  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    const PairTerm<T> t = term(s, pos);
    if (!in_window(t.value, low, high)) return;
    if (pos) {
      st.pos_sum += t.value;
      ++st.pos_cnt;
    } else {
      st.neg_sum += t.value;
      ++st.neg_cnt;
    }
  }
  __device__ T grad(T s, bool pos, int64_t i) const {
    const PairTerm<T> t = term(s, pos);
    if (!in_window(t.value, low, high)) return T(0);
    return (pos ? g_pos[i] : g_neg[i]) * contrastive_slope(t, cosine, pos);
  }
};

template <typename T>
__global__ void con_finish_kernel(const ConState* state, int64_t n, T* ps, int64_t* pc, T* ns,
                                  int64_t* nc) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  ps[i] = T(state[i].pos_sum);
  ns[i] = T(state[i].neg_sum);
  pc[i] = state[i].pos_cnt;
  nc[i] = state[i].neg_cnt;
}

// self_block: fold_all's (> 0: the self op's symmetric blocks; 0 for the op's own call)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> con_rows_fwd(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t chunk, int64_t self_block) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor ps = at::empty({B}, x.options()), ns = at::empty_like(ps);
  at::Tensor pc = at::empty({B}, x.options().dtype(at::kLong)), nc = at::empty_like(pc);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_fwd_cuda", [&] {
    using T = scalar_t;
    const ConRowLoss<T> loss{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    at::Tensor buf = make_states(B, ConState::empty(), x.options());
    ConState* state = reinterpret_cast<ConState*>(buf.data_ptr());
    fold_all<ConRowLoss<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, state,
                               self_block);
    if (B > 0) {
      con_finish_kernel<T><<<(int)((B + kThreads - 1) / kThreads), kThreads, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
          state, B, ps.data_ptr<T>(), pc.data_ptr<int64_t>(), ns.data_ptr<T>(),
          nc.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {ps, pc, ns, nc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t chunk, bool raw) {
  // (rows of any norm are the CPU op's form: the CUDA glue keeps raw L2 off this op)
  TORCH_CHECK(!raw, "contrastive_fwd: raw=True (rows of any norm) is CPU-only");
  return con_rows_fwd(x, r, labels, ref_labels, exclude_diag, cosine, pos_margin, neg_margin,
                      low, high, chunk, 0);
}

// The batch against itself (contrastive_self_fwd/bwd's schemas, csrc/cpu/contrastive_self_cpu.cpp)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_self_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t block, bool raw) {
  TORCH_CHECK(!raw, "contrastive_self_fwd: raw=True (rows of any norm) is CPU-only");
  cuda_pairs::check_block(block);
  return con_rows_fwd(x, x, labels, labels, true, cosine, pos_margin, neg_margin, low, high,
                      block, block);
}

std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x_,
    const at::Tensor& r_, const at::Tensor& labels_, const at::Tensor& ref_labels_,
    bool exclude_diag, bool cosine, double pos_margin, double neg_margin, double low,
    double high, int64_t chunk, bool raw) {
  TORCH_CHECK(!raw, "contrastive_bwd: raw=True (rows of any norm) is CPU-only");
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  check_row_vec(grad_pos, x_, "grad_pos");
  check_row_vec(grad_neg, x_, "grad_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto gp = grad_pos.to(x.scalar_type()).contiguous();
  auto gn = grad_neg.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_bwd_cuda", [&] {
    using T = scalar_t;
    const ConRowLoss<T> loss{cosine, T(pos_margin), T(neg_margin), T(low), T(high),
                             gp.data_ptr<T>(), gn.data_ptr<T>()};
    out = grad_all<ConRowLoss<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss);
  });
  return out;
}

at::Tensor contrastive_self_bwd_cuda(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                     const at::Tensor& x, const at::Tensor& labels,
                                     bool cosine, double pos_margin, double neg_margin,
                                     double low, double high, int64_t block, bool raw) {
  TORCH_CHECK(!raw, "contrastive_self_bwd: raw=True (rows of any norm) is CPU-only");
  return cuda_pairs::rows_self_bwd<2>(x, labels, block, {&grad_pos, &grad_neg},
                                      {"grad_pos", "grad_neg"}, [&](auto gp, auto gn) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(gp)>>;
    return ConRowLoss<T>{cosine, T(pos_margin), T(neg_margin), T(low), T(high), gp, gn};
  });
}

// ---- circle: per row the log-sum-exps of its two sides, loss softplus(lse⁺ + lse⁻)

template <typename T>
struct CircleRowLoss {
  using State = cuda_pairs::TwoSideLse<T>;
  CircleConsts<T> c;
  const T* g_rows = nullptr;  // backward: ∂L/∂row and the rows' side log-sum-exps
  const T* lse_pos = nullptr;
  const T* lse_neg = nullptr;

  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    if (pos) st.pos.push(circle_pos_logit(s, c));
    else st.neg.push(circle_neg_logit(s, c));
  }
  // the row's loss from its finished log-sum-exps: 0 when a side is empty
  __device__ T finish(T lp, T ln) const {
    return (isinf(lp) || isinf(ln)) ? T(0) : softplus20(lp + ln);
  }
  // g · softplus'(lse⁺ + lse⁻) · softmax within the side · ∓weight; 0 when a side is empty
  __device__ T grad(T s, bool pos, int64_t i) const {
    const T lp = lse_pos[i], ln = lse_neg[i];
    if (isinf(lp) || isinf(ln)) return T(0);
    const T gi = g_rows[i] * softplus20_grad(lp + ln);
    return pos ? -gi * circle_pos_weight(s, c) * std::exp(circle_pos_logit(s, c) - lp)
               : gi * circle_neg_weight(s, c) * std::exp(circle_neg_logit(s, c) - ln);
  }
};

// the loss for one dtype from the backward's per-row pointers (all null for the forward)
auto circle_loss_of(double m, double gamma) {
  return [=](auto g, auto lp, auto ln) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return CircleRowLoss<T>{circle_consts<T>(m, gamma), g, lp, ln};
  };
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> circle_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, double m, double gamma, int64_t chunk) {
  return cuda_pairs::two_side_fwd(x, r, labels, ref_labels, exclude_diag, chunk,
                                  circle_loss_of(m, gamma));
}

std::tuple<at::Tensor, at::Tensor> circle_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, bool exclude_diag, double m, double gamma, int64_t chunk,
    bool need_dr) {
  return cuda_pairs::two_side_bwd(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg,
                                  exclude_diag, chunk, need_dr, circle_loss_of(m, gamma));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> circle_self_fwd_cuda(const at::Tensor& x,
                                                                    const at::Tensor& labels,
                                                                    double m, double gamma,
                                                                    int64_t block) {
  return cuda_pairs::two_side_self_fwd(x, labels, block, circle_loss_of(m, gamma));
}

at::Tensor circle_self_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                const at::Tensor& labels, const at::Tensor& lse_pos,
                                const at::Tensor& lse_neg, double m, double gamma,
                                int64_t block) {
  return cuda_pairs::two_side_self_bwd(grad_rows, x, labels, lse_pos, lse_neg, block,
                                       circle_loss_of(m, gamma));
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("circle_self_fwd", &circle_self_fwd_cuda);
  m.impl("circle_self_bwd", &circle_self_bwd_cuda);
  m.impl("ms_loss_self_fwd", &ms_loss_self_fwd_cuda);
  m.impl("ms_loss_self_bwd", &ms_loss_self_bwd_cuda);
  m.impl("contrastive_self_fwd", &contrastive_self_fwd_cuda);
  m.impl("contrastive_self_bwd", &contrastive_self_bwd_cuda);
  m.impl("circle_fwd", &circle_fwd_cuda);
  m.impl("circle_bwd", &circle_bwd_cuda);
  m.impl("ms_loss_fwd", &ms_loss_fwd_cuda);
  m.impl("ms_loss_bwd", &ms_loss_bwd_cuda);
  m.impl("contrastive_fwd", &contrastive_fwd_cuda);
  m.impl("contrastive_bwd", &contrastive_bwd_cuda);
}

}  // namespace metrix_ops
