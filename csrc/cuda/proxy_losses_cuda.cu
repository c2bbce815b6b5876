// CUDA implementations of the fused ProxyAnchor and ProxyNCA ops (the schemas of
// csrc/cpu/proxy_anchor_cpu.cpp and proxy_nca_cpu.cpp, so the Python glue serves both
// devices), on the row-chunk engine of cuda/pair_rows.cuh with the class index as the label:
//   ProxyAnchor: rows are the C proxies, references the B examples; proxy c's positives are
//                the examples of label c. Each proxy's two log(1 + Σ e^{arg}) terms are its
//                row state, and the engine's (d rows, d refs) are (dp, dx).
//   ProxyNCA:    rows are the examples, references the proxies; each row's state is the
//                softmax's log-sum-exp and the logit of its own proxy.
// Per-entry math: common/proxy_anchor.h and common/proxy_nca.h, as the CPU ops.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/proxy_anchor.h"
#include "common/proxy_nca.h"
#include "cuda/pair_rows.cuh"

namespace metrix_ops {

namespace {

using cuda_pairs::fold_all;
using cuda_pairs::grad_all;
using cuda_pairs::kThreads;
using cuda_pairs::make_states;

void check_cuda_proxy_call(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                           int64_t chunk) {
  check_proxy_op_inputs(x, p, labels, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

at::Tensor class_ids(const at::Tensor& p) {
  return at::arange(p.size(0), p.options().dtype(at::kLong));
}

int launch_blocks(int64_t n) { return (int)((n + kThreads - 1) / kThreads); }

// ---- ProxyAnchor

// Rows are the proxies c, references the examples j; lw: the examples' log-weights added to
// every exponent (PML's indices_tuple weights, the weighted ops), or none
template <typename T>
struct PaRowLoss {
  using State = cuda_pairs::TwoSideLse<T>;
  T alpha, margin;
  const T* lw = nullptr;
  const T* g_pos = nullptr;  // backward: the proxies' upstream gradients and finished terms
  const T* g_neg = nullptr;
  const T* lp = nullptr;
  const T* ln = nullptr;

  __device__ T weight(int64_t j) const { return lw ? lw[j] : T(0); }
  __device__ void fold_at(State& st, T s, bool pos, int64_t, int64_t j) const {
    if (pos) st.pos.push(pa_pos_arg(s, alpha, margin) + weight(j));
    else st.neg.push(pa_neg_arg(s, alpha, margin) + weight(j));
  }
  // a weight shifts the finished term the entry is divided by: e^{arg + lw − lse}
  __device__ T grad_at(T s, bool pos, int64_t c, int64_t j) const {
    const T w = weight(j);
    return pa_grad(s, pos, alpha, margin, g_pos[c], g_neg[c], lp[c] - w, ln[c] - w);
  }
};

// lw: undefined, or (B,) of x's dtype and device (returned contiguous)
at::Tensor checked_log_w(const at::Tensor& lw, const at::Tensor& x) {
  if (!lw.defined()) return lw;
  TORCH_CHECK(lw.dim() == 1 && lw.size(0) == x.size(0) && lw.scalar_type() == x.scalar_type() &&
                  lw.device() == x.device(),
              "log_w must be a (", x.size(0), ",) tensor of x's dtype and device, got shape ",
              lw.sizes(), " ", lw.scalar_type(), " on ", lw.device());
  return lw.contiguous();
}

template <typename T>
const T* lw_ptr(const at::Tensor& lw) { return lw.defined() ? lw.data_ptr<T>() : nullptr; }

template <typename T>
__global__ void pa_finish_kernel(const typename PaRowLoss<T>::State* state, int64_t n, T* pos,
                                 T* neg) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= n) return;
  pos[c] = state[c].pos.value();
  neg[c] = state[c].neg.value();
}

std::tuple<at::Tensor, at::Tensor> pa_fwd(const at::Tensor& x_, const at::Tensor& p_,
                                          const at::Tensor& labels_, const at::Tensor& lw_,
                                          double alpha, double margin, int64_t chunk) {
  check_cuda_proxy_call(x_, p_, labels_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  const at::Tensor lw = checked_log_w(lw_, x_);
  const int64_t C = p.size(0);
  at::Tensor pos = at::empty({C}, x.options()), neg = at::empty_like(pos);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_fwd_cuda", [&] {
    using T = scalar_t;
    using State = typename PaRowLoss<T>::State;
    const PaRowLoss<T> loss{T(alpha), T(margin), lw_ptr<T>(lw)};
    // every proxy's terms start from the e^0 term of log(1 + Σ)
    at::Tensor buf = make_states(C, State{lse_with_one<T>(), lse_with_one<T>()}, x.options());
    State* state = reinterpret_cast<State*>(buf.data_ptr());
    fold_all<PaRowLoss<T>, T>(p, x, class_ids(p), labels, false, chunk, loss, state);
    if (C > 0) {
      pa_finish_kernel<T><<<launch_blocks(C), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          state, C, pos.data_ptr<T>(), neg.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {pos, neg};
}

std::tuple<at::Tensor, at::Tensor> pa_bwd(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x_,
    const at::Tensor& p_, const at::Tensor& labels_, const at::Tensor& lw_,
    const at::Tensor& pos_, const at::Tensor& neg_, double alpha, double margin,
    int64_t chunk) {
  check_cuda_proxy_call(x_, p_, labels_, chunk);
  const at::Tensor lw = checked_log_w(lw_, x_);
  check_row_vec(grad_pos, p_, "grad_pos");
  check_row_vec(grad_neg, p_, "grad_neg");
  check_row_vec(pos_, p_, "pos");
  check_row_vec(neg_, p_, "neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  const auto dt = x.scalar_type();
  auto gp = grad_pos.to(dt).contiguous(), gn = grad_neg.to(dt).contiguous();
  auto lp = pos_.to(dt).contiguous(), ln = neg_.to(dt).contiguous();
  at::Tensor dx, dp;
  AT_DISPATCH_FLOATING_TYPES(dt, "proxy_anchor_bwd_cuda", [&] {
    using T = scalar_t;
    const PaRowLoss<T> loss{T(alpha), T(margin), lw_ptr<T>(lw), gp.data_ptr<T>(),
                            gn.data_ptr<T>(), lp.data_ptr<T>(), ln.data_ptr<T>()};
    std::tie(dp, dx) = grad_all<PaRowLoss<T>, T>(p, x, class_ids(p), labels, false, chunk, loss);
  });
  return {dx, dp};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_fwd_cuda(const at::Tensor& x,
                                                         const at::Tensor& p,
                                                         const at::Tensor& labels,
                                                         double alpha, double margin,
                                                         int64_t chunk) {
  return pa_fwd(x, p, labels, at::Tensor(), alpha, margin, chunk);
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& p, const at::Tensor& labels, const at::Tensor& pos, const at::Tensor& neg,
    double alpha, double margin, int64_t chunk) {
  return pa_bwd(grad_pos, grad_neg, x, p, labels, at::Tensor(), pos, neg, alpha, margin, chunk);
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_weighted_fwd_cuda(
    const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, const at::Tensor& log_w,
    double alpha, double margin, int64_t chunk) {
  TORCH_CHECK(log_w.defined(), "log_w must be a tensor");
  return pa_fwd(x, p, labels, log_w, alpha, margin, chunk);
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_weighted_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& p, const at::Tensor& labels, const at::Tensor& log_w, const at::Tensor& pos,
    const at::Tensor& neg, double alpha, double margin, int64_t chunk) {
  TORCH_CHECK(log_w.defined(), "log_w must be a tensor");
  return pa_bwd(grad_pos, grad_neg, x, p, labels, log_w, pos, neg, alpha, margin, chunk);
}

// ---- ProxyNCA

template <typename T>
struct NcaRowLoss {
  struct State {
    OnlineLse<T> lse;
    T own;  // the logit of the row's own proxy (exactly one reference is positive)
    bool has_own;
    MO_HD static State empty() { return {OnlineLse<T>::empty(), T(0), false}; }
    MO_HD void merge(const State& o) {
      lse.merge(o.lse);
      if (o.has_own) {
        own = o.own;
        has_own = true;
      }
    }
  };
  T scale;
  int64_t kind;
  const T* g_rows = nullptr;  // backward: ∂L/∂row and the rows' log-sum-exps
  const T* lse = nullptr;

  __device__ void fold(State& st, T s, bool own, int64_t) const {
    const T l = nca_logit(s, scale, kind);
    st.lse.push(l);
    if (own) {
      st.own = l;
      st.has_own = true;
    }
  }
  __device__ T grad(T s, bool own, int64_t i) const {
    return g_rows[i] * nca_grad(s, own, scale, kind, lse[i]);
  }
};

template <typename T>
__global__ void nca_finish_kernel(const typename NcaRowLoss<T>::State* state, int64_t n, T* rows,
                                  T* lse) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  lse[i] = state[i].lse.value();
  rows[i] = nca_row_loss(state[i].lse, state[i].own);
}

void check_kind(int64_t kind) {
  TORCH_CHECK(kind == kNcaCosine || kind == kNcaSquaredL2, "kind must be 0 or 1, got ", kind);
}

std::tuple<at::Tensor, at::Tensor> proxy_nca_fwd_cuda(const at::Tensor& x_, const at::Tensor& p_,
                                                      const at::Tensor& labels_, double scale,
                                                      int64_t kind, int64_t chunk) {
  check_cuda_proxy_call(x_, p_, labels_, chunk);
  check_kind(kind);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor rows = at::empty({B}, x.options()), lse = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_fwd_cuda", [&] {
    using T = scalar_t;
    using State = typename NcaRowLoss<T>::State;
    const NcaRowLoss<T> loss{T(scale), kind};
    at::Tensor buf = make_states(B, State::empty(), x.options());
    State* state = reinterpret_cast<State*>(buf.data_ptr());
    fold_all<NcaRowLoss<T>, T>(x, p, labels, class_ids(p), false, chunk, loss, state);
    if (B > 0) {
      nca_finish_kernel<T><<<launch_blocks(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          state, B, rows.data_ptr<T>(), lse.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, lse};
}

std::tuple<at::Tensor, at::Tensor> proxy_nca_bwd_cuda(const at::Tensor& grad_rows,
                                                      const at::Tensor& x_, const at::Tensor& p_,
                                                      const at::Tensor& labels_,
                                                      const at::Tensor& lse_, double scale,
                                                      int64_t kind, int64_t chunk) {
  check_cuda_proxy_call(x_, p_, labels_, chunk);
  check_kind(kind);
  check_row_vec(grad_rows, x_, "grad_rows");
  check_row_vec(lse_, x_, "lse");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  auto g = grad_rows.to(x.scalar_type()).contiguous(), lse = lse_.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_bwd_cuda", [&] {
    using T = scalar_t;
    const NcaRowLoss<T> loss{T(scale), kind, g.data_ptr<T>(), lse.data_ptr<T>()};
    out = grad_all<NcaRowLoss<T>, T>(x, p, labels, class_ids(p), false, chunk, loss);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("proxy_anchor_fwd", &proxy_anchor_fwd_cuda);
  m.impl("proxy_anchor_bwd", &proxy_anchor_bwd_cuda);
  m.impl("proxy_anchor_weighted_fwd", &proxy_anchor_weighted_fwd_cuda);
  m.impl("proxy_anchor_weighted_bwd", &proxy_anchor_weighted_bwd_cuda);
  m.impl("proxy_nca_fwd", &proxy_nca_fwd_cuda);
  m.impl("proxy_nca_bwd", &proxy_nca_bwd_cuda);
}

}  // namespace metrix_ops
