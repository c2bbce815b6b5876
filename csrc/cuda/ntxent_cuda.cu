// CUDA implementations of the fused NT-Xent and SupCon ops (the schemas of
// csrc/cpu/ntxent_cpu.cpp, so the Python glue serves both devices), on the row-chunk engine
// of cuda/pair_rows.cuh, with the per-pair math of common/ntxent.h.
//
// NT-Xent needs each anchor's negatives before its positives (a positive pair's probability
// is against all of them), so its forward is two folds over the chunks: the negatives'
// (max, Σ e^{z − max}), then the positive pairs' losses inside the reducer's window. Its
// backward folds each anchor's total positive weight first (every negative's gradient is
// scaled by it), then writes G. Each extra fold is one more chunk product: recomputing S is
// the price of never holding it.
// SupCon needs one fold: the log-sum-exp over the pairs, Σ_P z and the positive count.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/contrastive.h"  // in_window
#include "common/ntxent.h"
#include "cuda/pair_rows.cuh"

namespace metrix_ops {

namespace {

using cuda_pairs::fold_all;
using cuda_pairs::grad_all;
using cuda_pairs::kThreads;
using cuda_pairs::make_states;

void check_call(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                const at::Tensor& ref_labels, int64_t chunk, double temperature) {
  check_pair_op_inputs(x, r, labels, ref_labels, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  TORCH_CHECK(temperature != 0 && std::isfinite(temperature),
              "temperature must be finite and nonzero, got ", temperature);
}

int launch_blocks(int64_t n) { return (int)((n + kThreads - 1) / kThreads); }

// ---- NT-Xent, pass 1: the negatives' logits as (max, Σ e^{z − max})

template <typename T>
struct NtxNegatives {
  using State = OnlineLse<T>;
  T t;
  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    if (!pos) st.push(ntx_logit(s, t));
  }
  __device__ T grad(T, bool, int64_t) const { return T(0); }
};

// The positive pair (i, z)'s probability against row i's negatives
template <typename T>
__device__ NtxProb<T> ntx_pair(T z, const T* neg_max, const T* neg_sum, int64_t i) {
  return ntx_prob(z, neg_max[i], neg_sum[i]);
}

// ---- NT-Xent, pass 2 (forward): the sum and count of the kept positive-pair losses, and
// their total weight (the backward's w_total, which the self op's forward returns)

struct SumCount {
  double sum;
  long long count;
  double wsum;
  MO_HD static SumCount empty() { return {0.0, 0, 0.0}; }
  MO_HD void merge(const SumCount& o) {
    sum += o.sum;
    count += o.count;
    wsum += o.wsum;
  }
};

template <typename T>
struct NtxPositives {
  using State = SumCount;
  T t, low, high;
  const T* neg_max;
  const T* neg_sum;
  __device__ void fold(State& st, T s, bool pos, int64_t i) const {
    if (!pos) return;
    const NtxProb<T> p = ntx_pair(ntx_logit(s, t), neg_max, neg_sum, i);
    const T loss = ntx_loss(p);
    if (in_window(loss, low, high)) {
      st.sum += loss;
      ++st.count;
      st.wsum += ntx_pos_weight(p);
    }
  }
  __device__ T grad(T, bool, int64_t) const { return T(0); }
};

// ---- NT-Xent backward: each row's total weight of its kept positive pairs, then G

template <typename T>
struct NtxWeights {
  using State = SumCount;  // the count and wsum are unused
  T t, low, high;
  const T* neg_max;
  const T* neg_sum;
  __device__ void fold(State& st, T s, bool pos, int64_t i) const {
    if (!pos) return;
    const NtxProb<T> p = ntx_pair(ntx_logit(s, t), neg_max, neg_sum, i);
    if (in_window(ntx_loss(p), low, high)) st.sum += ntx_pos_weight(p);
  }
  __device__ T grad(T, bool, int64_t) const { return T(0); }
};

template <typename T>
struct NtxGrad {
  struct State {  // unused: the backward's only fold is NtxWeights
    MO_HD static State empty() { return {}; }
    MO_HD void merge(const State&) {}
  };
  T t, low, high;
  const T* neg_max;
  const T* neg_sum;
  const T* g;        // ∂L/∂(row's sum)
  const T* w_total;  // the row's kept positive weights, summed
  // positive: −(g/τ)·w; negative: (g/τ)·W·e^{z − m}/Σ (the pairs' weights spread by softmax)
  __device__ T grad(T s, bool pos, int64_t i) const {
    const T z = ntx_logit(s, t), gi = g[i] / t;
    if (pos) {
      const NtxProb<T> p = ntx_pair(z, neg_max, neg_sum, i);
      return in_window(ntx_loss(p), low, high) ? -gi * ntx_pos_weight(p) : T(0);
    }
    const T sum = neg_sum[i];
    return sum > T(0) ? gi * w_total[i] / sum * std::exp(z - neg_max[i]) : T(0);
  }
  __device__ void fold(State&, T, bool, int64_t) const {}
};

template <typename T>
__global__ void ntx_neg_finish(const OnlineLse<T>* state, int64_t n, T* nm, T* ns) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  nm[i] = state[i].m;  // −inf and 0 without negatives
  ns[i] = state[i].s;
}

template <typename T>
__global__ void sum_count_finish(const SumCount* state, int64_t n, T* sums, int64_t* counts,
                                 T* wsums = nullptr) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  sums[i] = T(state[i].sum);
  if (counts != nullptr) counts[i] = state[i].count;
  if (wsums != nullptr) wsums[i] = T(state[i].wsum);
}

// self_block: fold_all's (> 0: the self op's symmetric blocks; 0 for the op's own call).
// Returns (sums, counts, neg_max, neg_sum, w_total).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_rows_fwd(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, double temperature, double low,
    double high, int64_t chunk, int64_t self_block) {
  check_call(x_, r_, labels_, ref_labels_, chunk, temperature);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor sums = at::zeros({B}, x.options()), nm = at::empty_like(sums),
             ns = at::empty_like(sums), w_total = at::zeros_like(sums);
  at::Tensor counts = at::zeros({B}, x.options().dtype(at::kLong));
  if (B == 0) return {sums, counts, nm, ns, w_total};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ntxent_fwd_cuda", [&] {
    using T = scalar_t;
    const NtxNegatives<T> negs{T(temperature)};
    at::Tensor nbuf = make_states(B, OnlineLse<T>::empty(), x.options());
    auto* nstate = reinterpret_cast<OnlineLse<T>*>(nbuf.data_ptr());
    fold_all<NtxNegatives<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, negs, nstate,
                                 self_block);
    ntx_neg_finish<T><<<launch_blocks(B), kThreads, 0, stream>>>(nstate, B, nm.data_ptr<T>(),
                                                                 ns.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const NtxPositives<T> poss{T(temperature), T(low), T(high), nm.data_ptr<T>(),
                               ns.data_ptr<T>()};
    at::Tensor pbuf = make_states(B, SumCount::empty(), x.options());
    auto* pstate = reinterpret_cast<SumCount*>(pbuf.data_ptr());
    fold_all<NtxPositives<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, poss, pstate,
                                 self_block);
    sum_count_finish<T><<<launch_blocks(B), kThreads, 0, stream>>>(
        pstate, B, sums.data_ptr<T>(), counts.data_ptr<int64_t>(), w_total.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts, nm, ns, w_total};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, double temperature, double low,
    double high, int64_t chunk) {
  auto [sums, counts, nm, ns, w_total] = ntxent_rows_fwd(x, r, labels, ref_labels, exclude_diag,
                                                         temperature, low, high, chunk, 0);
  return {sums, counts, nm, ns};
}

// Each row's total weight of its kept positive pairs (NtxWeights' fold; the inputs contiguous,
// nm and ns in x's dtype).
at::Tensor ntx_weight_totals(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                             const at::Tensor& ref_labels, bool exclude_diag, double temperature,
                             double low, double high, const at::Tensor& nm, const at::Tensor& ns,
                             int64_t chunk) {
  const int64_t B = x.size(0);
  at::Tensor w_total = at::zeros({B}, x.options());
  if (B == 0) return w_total;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ntx_weight_totals_cuda", [&] {
    using T = scalar_t;
    const NtxWeights<T> weights{T(temperature), T(low), T(high), nm.data_ptr<T>(),
                                ns.data_ptr<T>()};
    at::Tensor wbuf = make_states(B, SumCount::empty(), x.options());
    auto* wstate = reinterpret_cast<SumCount*>(wbuf.data_ptr());
    fold_all<NtxWeights<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, weights, wstate);
    sum_count_finish<T><<<launch_blocks(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        wstate, B, w_total.data_ptr<T>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return w_total;
}

std::tuple<at::Tensor, at::Tensor> ntxent_bwd_cuda(
    const at::Tensor& grad_sums, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& neg_max_,
    const at::Tensor& neg_sum_, bool exclude_diag, double temperature, double low, double high,
    int64_t chunk, bool need_dr) {
  check_call(x_, r_, labels_, ref_labels_, chunk, temperature);
  check_row_vec(grad_sums, x_, "grad_sums");
  check_row_vec(neg_max_, x_, "neg_max");
  check_row_vec(neg_sum_, x_, "neg_sum");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const auto dt = x.scalar_type();
  auto g = grad_sums.to(dt).contiguous();
  auto nm = neg_max_.to(dt).contiguous(), ns = neg_sum_.to(dt).contiguous();
  const at::Tensor w_total = ntx_weight_totals(x, r, labels, ref_labels, exclude_diag,
                                               temperature, low, high, nm, ns, chunk);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(dt, "ntxent_bwd_cuda", [&] {
    using T = scalar_t;
    const NtxGrad<T> grad{T(temperature), T(low), T(high), nm.data_ptr<T>(), ns.data_ptr<T>(),
                          g.data_ptr<T>(), w_total.data_ptr<T>()};
    out = grad_all<NtxGrad<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, grad, need_dr);
  });
  return out;
}

// The batch against itself (ntxent_self_fwd/bwd's schemas, csrc/cpu/ntxent_self_cpu.cpp): S's
// symmetric blocks (cuda_pairs::fold_self, grad_self); the forward also gives w_total (from
// its positives' pass), which the self backward takes instead of a weights pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_self_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, double temperature, double low, double high,
    int64_t block) {
  cuda_pairs::check_block(block);
  return ntxent_rows_fwd(x, x, labels, labels, true, temperature, low, high, block, block);
}

at::Tensor ntxent_self_bwd_cuda(const at::Tensor& grad_sums, const at::Tensor& x,
                                const at::Tensor& labels, const at::Tensor& neg_max,
                                const at::Tensor& neg_sum, const at::Tensor& w_total,
                                double temperature, double low, double high, int64_t block) {
  cuda_pairs::check_block(block);
  check_call(x, x, labels, labels, block, temperature);
  return cuda_pairs::rows_self_bwd<4>(
      x, labels, block, {&grad_sums, &neg_max, &neg_sum, &w_total},
      {"grad_sums", "neg_max", "neg_sum", "w_total"}, [&](auto g, auto nm, auto ns, auto w) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return NtxGrad<T>{T(temperature), T(low), T(high), nm, ns, g, w};
  });
}

// ---- SupCon: log-sum-exp of z over the row's pairs, Σ_P z, |P|

template <typename T>
struct SupConRows {
  struct State {
    OnlineLse<T> lse;
    T pos_sum, n_pos;
    MO_HD static State empty() { return {OnlineLse<T>::empty(), T(0), T(0)}; }
    MO_HD void merge(const State& o) {
      lse.merge(o.lse);
      pos_sum += o.pos_sum;
      n_pos += o.n_pos;
    }
  };
  T t;
  const T* g = nullptr;      // backward: ∂L/∂row, the rows' log-sum-exps and positive counts
  const T* lse = nullptr;
  const T* n_pos = nullptr;

  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    const T z = ntx_logit(s, t);
    st.lse.push(z);
    if (pos) {
      st.pos_sum += z;
      st.n_pos += T(1);
    }
  }
  // (g/τ)·(softmax − [positive]/|P|); nothing without positives
  __device__ T grad(T s, bool pos, int64_t i) const {
    const T n = n_pos[i];
    if (!(n > T(0))) return T(0);
    return g[i] / t * supcon_grad(std::exp(ntx_logit(s, t) - lse[i]), pos, T(1) / n);
  }
};

template <typename T>
__global__ void supcon_finish(const typename SupConRows<T>::State* state, int64_t n, T* rows,
                              T* lse) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T l = state[i].lse.value();  // −inf without pairs
  lse[i] = l;
  // the shift of PML's form cancels in −(Σ_P z − |P|·lse)/|P|: z and lse unshifted here
  rows[i] = isinf(l) ? T(0) : supcon_loss(l, state[i].pos_sum, state[i].n_pos);
}

// Each row's positive count (the backward's 1/|P|) from the labels alone: no product needed
at::Tensor positive_counts(const at::Tensor& labels, const at::Tensor& ref_labels,
                           bool exclude_diag, at::ScalarType dt) {
  at::Tensor sorted = std::get<0>(ref_labels.sort());
  at::Tensor n = at::searchsorted(sorted, labels, false, true) -
                 at::searchsorted(sorted, labels, false, false);
  if (exclude_diag) {  // row i's own column, when it exists and has its label
    const int64_t k = std::min(labels.size(0), ref_labels.size(0));
    n.narrow(0, 0, k).sub_(labels.narrow(0, 0, k).eq(ref_labels.narrow(0, 0, k)).to(n.scalar_type()));
  }
  return n.to(dt);
}

// self_block: fold_all's (> 0: the self op's symmetric blocks; 0 for the op's own call)
std::tuple<at::Tensor, at::Tensor> supcon_rows_fwd(const at::Tensor& x_, const at::Tensor& r_,
                                                   const at::Tensor& labels_,
                                                   const at::Tensor& ref_labels_,
                                                   bool exclude_diag, double temperature,
                                                   int64_t chunk, int64_t self_block) {
  check_call(x_, r_, labels_, ref_labels_, chunk, temperature);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor rows = at::zeros({B}, x.options()), lse = at::empty_like(rows);
  if (B == 0) return {rows, lse};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "supcon_fwd_cuda", [&] {
    using T = scalar_t;
    using State = typename SupConRows<T>::State;
    const SupConRows<T> loss{T(temperature)};
    at::Tensor buf = make_states(B, State::empty(), x.options());
    State* state = reinterpret_cast<State*>(buf.data_ptr());
    fold_all<SupConRows<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, state,
                               self_block);
    supcon_finish<T><<<launch_blocks(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        state, B, rows.data_ptr<T>(), lse.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, lse};
}

std::tuple<at::Tensor, at::Tensor> supcon_fwd_cuda(const at::Tensor& x, const at::Tensor& r,
                                                   const at::Tensor& labels,
                                                   const at::Tensor& ref_labels,
                                                   bool exclude_diag, double temperature,
                                                   int64_t chunk) {
  return supcon_rows_fwd(x, r, labels, ref_labels, exclude_diag, temperature, chunk, 0);
}

// The batch against itself (supcon_self_fwd/bwd's schemas, csrc/cpu/supcon_self_cpu.cpp): S's
// symmetric blocks (cuda_pairs::fold_self, grad_self).
std::tuple<at::Tensor, at::Tensor> supcon_self_fwd_cuda(const at::Tensor& x,
                                                        const at::Tensor& labels,
                                                        double temperature, int64_t block) {
  cuda_pairs::check_block(block);
  return supcon_rows_fwd(x, x, labels, labels, true, temperature, block, block);
}

std::tuple<at::Tensor, at::Tensor> supcon_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_,
    bool exclude_diag, double temperature, int64_t chunk, bool need_dr) {
  check_call(x_, r_, labels_, ref_labels_, chunk, temperature);
  check_row_vec(grad_rows, x_, "grad_rows");
  check_row_vec(lse_, x_, "lse");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const auto dt = x.scalar_type();
  auto g = grad_rows.to(dt).contiguous(), lse = lse_.to(dt).contiguous();
  at::Tensor n_pos = positive_counts(labels, ref_labels, exclude_diag, dt).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(dt, "supcon_bwd_cuda", [&] {
    using T = scalar_t;
    const SupConRows<T> loss{T(temperature), g.data_ptr<T>(), lse.data_ptr<T>(),
                             n_pos.data_ptr<T>()};
    out = grad_all<SupConRows<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss,
                                     need_dr);
  });
  return out;
}

at::Tensor supcon_self_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                const at::Tensor& labels, const at::Tensor& lse,
                                double temperature, int64_t block) {
  cuda_pairs::check_block(block);
  check_call(x, x, labels, labels, block, temperature);
  const at::Tensor n_pos = positive_counts(labels, labels, true, x.scalar_type());
  return cuda_pairs::rows_self_bwd<3>(x, labels, block, {&grad_rows, &lse, &n_pos},
                                      {"grad_rows", "lse", "n_pos"}, [&](auto g, auto l, auto n) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return SupConRows<T>{T(temperature), g, l, n};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("ntxent_self_fwd", &ntxent_self_fwd_cuda);
  m.impl("ntxent_self_bwd", &ntxent_self_bwd_cuda);
  m.impl("supcon_self_fwd", &supcon_self_fwd_cuda);
  m.impl("supcon_self_bwd", &supcon_self_bwd_cuda);
  m.impl("ntxent_fwd", &ntxent_fwd_cuda);
  m.impl("ntxent_bwd", &ntxent_bwd_cuda);
  m.impl("supcon_fwd", &supcon_fwd_cuda);
  m.impl("supcon_bwd", &supcon_bwd_cuda);
}

}  // namespace metrix_ops
