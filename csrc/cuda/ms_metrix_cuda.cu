// Embedding-level Metrix for MultiSimilarityLoss on the CUDA engine (cuda/metrix_rows.cuh:
// pairs "pos_neg" or "anchor_neg", the batch against itself or against references): per
// anchor a its mixed term
//
//     ℓ̃(a) = (1/α) log(1 + λ Σ_V e^{−α(s̃−base)}) + (1/β) log(1 + (1−λ) Σ_V e^{β(s̃−base)}).
//
// Each side is an online log-sum-exp of the candidates' exponents, then merged with the term
// 1/y (y = λ or 1 − λ), so it ends as log(1/y + Σ e^·), the normaliser the gradient divides
// by; ℓ̃'s side is (that + log y)/k, and a side with y = 0 contributes nothing. The
// candidates' weight: w = g_a (e^{β(s̃−b) − lse⁻_a} − e^{−α(s̃−b) − lse⁺_a}) (per side times
// its flag).
#include <torch/library.h>

#include <cmath>

#include "common/row_state.h"
#include "cuda/metrix_rows.cuh"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

using cuda_metrix::MixPlan;
using cuda_metrix::kThreads;

// MS's constants for one call, and per side (+, −) the start of the finished log-sum-exp
// (log 1/y), log y and the side's flag (y > 0)
template <typename T>
struct MsMix {
  using State = cuda_pairs::TwoSideLse<T>;
  T alpha, beta, base;
  T start_p, start_n, logy_p, logy_n, flag_p, flag_n;
  const T* g = nullptr;  // backward: ∂L/∂ℓ̃ per anchor and the saved log-sum-exps
  const T* lp = nullptr;
  const T* ln = nullptr;

  __device__ void push(State& st, T v) const {
    st.pos.push(-alpha * (v - base));
    st.neg.push(beta * (v - base));
  }
  __device__ bool live(int64_t a) const { return g[a] != T(0); }
  __device__ T weight(T v, int64_t a) const {
    const T xp = -alpha * (v - base), xn = beta * (v - base);
    return g[a] * (flag_n * std::exp(xn - ln[a]) - flag_p * std::exp(xp - lp[a]));
  }
};

template <typename T>
MsMix<T> ms_mix(double lam, double alpha, double beta, double base) {
  auto side = [](double y, T* start, T* logy, T* flag) {
    *start = y > 0 ? T(-std::log(y)) : T(0);
    *logy = y > 0 ? T(std::log(y)) : T(0);
    *flag = y > 0 ? T(1) : T(0);
  };
  MsMix<T> m{T(alpha), T(beta), T(base)};
  side(lam, &m.start_p, &m.logy_p, &m.flag_p);
  side(1.0 - lam, &m.start_n, &m.logy_n, &m.flag_n);
  return m;
}

// ℓ̃ and the two finished log-sum-exps per anchor from its folded state
template <typename T>
__global__ void ms_mix_finish_kernel(const cuda_pairs::TwoSideLse<T>* state, int64_t n,
                                     MsMix<T> m, T* mix, T* lp, T* ln) {
  const int64_t a = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (a >= n) return;
  OnlineLse<T> p{m.start_p, T(1)}, q{m.start_n, T(1)};  // the 1/y terms
  p.merge(state[a].pos);
  q.merge(state[a].neg);
  lp[a] = p.value();
  ln[a] = q.value();
  mix[a] = m.flag_p * (lp[a] + m.logy_p) / m.alpha + m.flag_n * (ln[a] + m.logy_n) / m.beta;
}

// The two ops' bodies on a call's plan
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_mix_fwd(const MixPlan& c, double alpha,
                                                          double beta, double base, double lam,
                                                          bool anchor_neg) {
  const int64_t B = c.x.size(0);
  at::Tensor mix = at::zeros({B}, c.x.options()), lp = at::zeros_like(mix),
             ln = at::zeros_like(mix);
  if (B == 0) return {mix, lp, ln};
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "ms_metrix_mix_fwd_cuda", [&] {
    using T = scalar_t;
    const MsMix<T> m = ms_mix<T>(lam, alpha, beta, base);
    using State = typename MsMix<T>::State;
    at::Tensor buf = cuda_pairs::make_states(B, State::empty(), c.x.options());
    auto* state = reinterpret_cast<State*>(buf.data_ptr());
    cuda_metrix::fold_all_mix<MsMix<T>, T>(c, anchor_neg, T(lam), m, state);
    ms_mix_finish_kernel<T><<<(unsigned)((B + kThreads - 1) / kThreads), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
        state, B, m, mix.data_ptr<T>(), lp.data_ptr<T>(), ln.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mix, lp, ln};
}

std::pair<at::Tensor, at::Tensor> ms_mix_bwd(const MixPlan& c, const at::Tensor& grad,
                                             const at::Tensor& lse_pos, const at::Tensor& lse_neg,
                                             double alpha, double beta, double base, double lam,
                                             bool anchor_neg, bool need_dc) {
  check_row_vec(grad, c.x, "grad");
  check_row_vec(lse_pos, c.x, "lse_pos");
  check_row_vec(lse_neg, c.x, "lse_neg");
  auto g = grad.to(c.x.scalar_type()).contiguous();
  auto lp = lse_pos.to(c.x.scalar_type()).contiguous();
  auto ln = lse_neg.to(c.x.scalar_type()).contiguous();
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "ms_metrix_mix_bwd_cuda", [&] {
    using T = scalar_t;
    MsMix<T> m = ms_mix<T>(lam, alpha, beta, base);
    m.g = g.data_ptr<T>();
    m.lp = lp.data_ptr<T>();
    m.ln = ln.data_ptr<T>();
    out = cuda_metrix::grad_all_mix<MsMix<T>, T>(c, anchor_neg, T(lam), m, need_dc);
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_metrix_mix_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& cstart,
    const at::Tensor& csize, double alpha, double beta, double base, double lam,
    bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return ms_mix_fwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), alpha, beta, base,
                    lam, anchor_neg);
}

at::Tensor ms_metrix_mix_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                  const at::Tensor& labels, const at::Tensor& cstart,
                                  const at::Tensor& csize, const at::Tensor& lse_pos,
                                  const at::Tensor& lse_neg, double alpha, double beta,
                                  double base, double lam, bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return ms_mix_bwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), grad, lse_pos,
                    lse_neg, alpha, beta, base, lam, anchor_neg, true)
      .first;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_metrix_mix_refs_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& self, double alpha, double beta, double base,
    double lam, bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return ms_mix_fwd(c, alpha, beta, base, lam, anchor_neg);
}

std::tuple<at::Tensor, at::Tensor> ms_metrix_mix_refs_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& self, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, double alpha, double beta, double base, double lam,
    bool anchor_neg, int64_t chunk, bool need_dr) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return ms_mix_bwd(c, grad, lse_pos, lse_neg, alpha, beta, base, lam, anchor_neg, need_dr);
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // MultiSimilarityLoss's embedding-level Metrix term on CUDA tensors: unit rows x sorted by
  // label, each row's class start and size; per anchor (ℓ̃, lse⁺, lse⁻), 0 where V(a) is
  // empty. Row chunks of whole classes, about `chunk` rows each.
  m.def("ms_metrix_mix_fwd(Tensor x, Tensor labels, Tensor class_start, Tensor class_size, "
        "float alpha, float beta, float base, float lam, bool anchor_neg, int chunk) "
        "-> (Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("ms_metrix_mix_bwd(Tensor grad, Tensor x, Tensor labels, Tensor class_start, "
        "Tensor class_size, Tensor lse_pos, Tensor lse_neg, float alpha, float beta, "
        "float base, float lam, bool anchor_neg, int chunk) -> Tensor",
        METRIX_HOST_READS);
  // The same against references: label-sorted unit anchors x and unit references r, self[a]
  // anchor a's own row of r (−1: none; neither a pair nor a positive). Chunks of whole
  // classes whose anchors and positives come to about `chunk` rows. Backward: (dx, dr), dr
  // zeros unless need_dr.
  m.def("ms_metrix_mix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, float alpha, float beta, float base, float lam, bool anchor_neg, "
        "int chunk) -> (Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("ms_metrix_mix_refs_bwd(Tensor grad, Tensor x, Tensor r, Tensor labels, "
        "Tensor ref_labels, Tensor self, Tensor lse_pos, Tensor lse_neg, float alpha, "
        "float beta, float base, float lam, bool anchor_neg, int chunk, bool need_dr) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("ms_metrix_mix_fwd", &ms_metrix_mix_fwd_cuda);
  m.impl("ms_metrix_mix_bwd", &ms_metrix_mix_bwd_cuda);
  m.impl("ms_metrix_mix_refs_fwd", &ms_metrix_mix_refs_fwd_cuda);
  m.impl("ms_metrix_mix_refs_bwd", &ms_metrix_mix_refs_bwd_cuda);
}

}  // namespace metrix_ops
