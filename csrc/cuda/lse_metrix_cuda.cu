// Embedding-level Metrix for CircleLoss and GeneralizedLiftedStructureLoss on the CUDA engine
// (cuda/metrix_rows.cuh: pairs "pos_neg" or "anchor_neg", the batch against itself or
// against references): per anchor the two log-sum-exps lse⁺ = log Σ_V e^{pos(s̃)} and
// lse⁻ = log Σ_V e^{neg(s̃)} of its candidates' exponents (−inf without a candidate), the
// per-candidate code of the CPU kernels (common/circle_metrix.h, common/lifted_metrix.h). The label weights, the softplus or hinge
// and the reduction are applied to them in PyTorch, as for the CPU ops (ops/circle_metrix.py,
// ops/lifted_metrix.py). The candidates' weight: w = g⁺_a e^{pos − lse⁺_a} ∂pos/∂s̃ +
// g⁻_a e^{neg − lse⁻_a} ∂neg/∂s̃.
#include <torch/library.h>

#include <cmath>

#include "common/circle_metrix.h"
#include "common/lifted_metrix.h"
#include "cuda/metrix_rows.cuh"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

using cuda_metrix::MixPlan;
using cuda_metrix::kThreads;

// Circle's exponents at a candidate's cosine
template <typename T>
struct CircleExp {
  CircleConsts<T> c;
  __device__ LseMixTerms<T> operator()(T v) const { return circle_mix_terms<T, T>(v, c); }
};

// GeneralizedLifted's exponents: L2 of unit rows (a coincident candidate, 2 − 2s̃ below 16ε,
// at d = 0 with no slope, as the CPU kernels) or the plain cosine
template <typename T>
struct LiftedExp {
  bool cosine;
  T pos_margin, neg_margin;
  __device__ LseMixTerms<T> operator()(T v) const {
    if (cosine) return lifted_mix_terms<T, T>(v, T(1), true, pos_margin, neg_margin);
    const T q = con_mix_sq_dist<T, T>(v);
    const bool far = q >= con_mix_coincident_below<T>();
    const T d = std::sqrt(q);
    return lifted_mix_terms<T, T>(far ? d : T(0), far ? T(1) / d : T(0), false, pos_margin,
                                  neg_margin);
  }
};

template <typename T, class Exp>
struct LseMix {
  using State = cuda_pairs::TwoSideLse<T>;
  Exp exp_of;
  const T* g_pos = nullptr;  // backward: ∂L/∂lse⁺, ∂L/∂lse⁻ per anchor and the saved lses
  const T* g_neg = nullptr;
  const T* lp = nullptr;
  const T* ln = nullptr;

  __device__ void push(State& st, T v) const {
    const LseMixTerms<T> t = exp_of(v);
    st.pos.push(t.pos);
    st.neg.push(t.neg);
  }
  __device__ bool live(int64_t a) const { return g_pos[a] != T(0) || g_neg[a] != T(0); }
  __device__ T weight(T v, int64_t a) const {
    const LseMixTerms<T> t = exp_of(v);
    T w = T(0);
    if (g_pos[a] != T(0)) w += g_pos[a] * std::exp(t.pos - lp[a]) * t.dpos;
    if (g_neg[a] != T(0)) w += g_neg[a] * std::exp(t.neg - ln[a]) * t.dneg;
    return w;
  }
};

template <typename T>
__global__ void lse_finish_kernel(const cuda_pairs::TwoSideLse<T>* state, int64_t n, T* lp,
                                  T* ln) {
  const int64_t a = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (a >= n) return;
  lp[a] = state[a].pos.value();  // −inf without a candidate
  ln[a] = state[a].neg.value();
}

// The ops' bodies on a call's plan: make_exp(T{}) builds the loss's exponents for one dtype
template <class MakeExp>
std::tuple<at::Tensor, at::Tensor> lse_mix_fwd(const MixPlan& c, double lam, bool anchor_neg,
                                               MakeExp make_exp) {
  const int64_t B = c.x.size(0);
  at::Tensor lp = at::full({B}, -std::numeric_limits<double>::infinity(), c.x.options());
  at::Tensor ln = lp.clone();
  if (B == 0) return {lp, ln};
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lse_metrix_mix_fwd_cuda", [&] {
    using T = scalar_t;
    using Exp = decltype(make_exp(T{}));
    const LseMix<T, Exp> loss{make_exp(T{})};
    using State = typename LseMix<T, Exp>::State;
    at::Tensor buf = cuda_pairs::make_states(B, State::empty(), c.x.options());
    auto* state = reinterpret_cast<State*>(buf.data_ptr());
    cuda_metrix::fold_all_mix<LseMix<T, Exp>, T>(c, anchor_neg, T(lam), loss, state);
    lse_finish_kernel<T><<<(unsigned)((B + kThreads - 1) / kThreads), kThreads, 0,
                           c10::cuda::getCurrentCUDAStream()>>>(state, B, lp.data_ptr<T>(),
                                                                 ln.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lp, ln};
}

template <class MakeExp>
std::pair<at::Tensor, at::Tensor> lse_mix_bwd(const MixPlan& c, const at::Tensor& grad_pos,
                                              const at::Tensor& grad_neg,
                                              const at::Tensor& lse_pos,
                                              const at::Tensor& lse_neg, double lam,
                                              bool anchor_neg, bool need_dc, MakeExp make_exp) {
  check_row_vec(grad_pos, c.x, "grad_pos");
  check_row_vec(grad_neg, c.x, "grad_neg");
  check_row_vec(lse_pos, c.x, "lse_pos");
  check_row_vec(lse_neg, c.x, "lse_neg");
  const auto dt = c.x.scalar_type();
  auto gp = grad_pos.to(dt).contiguous(), gn = grad_neg.to(dt).contiguous();
  auto lp = lse_pos.to(dt).contiguous(), ln = lse_neg.to(dt).contiguous();
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(dt, "lse_metrix_mix_bwd_cuda", [&] {
    using T = scalar_t;
    using Exp = decltype(make_exp(T{}));
    const LseMix<T, Exp> loss{make_exp(T{}), gp.data_ptr<T>(), gn.data_ptr<T>(),
                              lp.data_ptr<T>(), ln.data_ptr<T>()};
    out = cuda_metrix::grad_all_mix<LseMix<T, Exp>, T>(c, anchor_neg, T(lam), loss, need_dc);
  });
  return out;
}

// The losses' exponents for the dtype of the argument (make_exp(T{}) above)
struct CircleMaker {
  double m, gamma;
  template <typename T>
  CircleExp<T> operator()(T) const { return CircleExp<T>{circle_consts<T>(m, gamma)}; }
};

struct LiftedMaker {
  bool cosine;
  double pos_margin, neg_margin;
  template <typename T>
  LiftedExp<T> operator()(T) const {
    return LiftedExp<T>{cosine, T(pos_margin), T(neg_margin)};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> circle_metrix_mix_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& cstart,
    const at::Tensor& csize, double m, double gamma, double lam, bool anchor_neg,
    int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return lse_mix_fwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), lam, anchor_neg,
                     CircleMaker{m, gamma});
}

at::Tensor circle_metrix_mix_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& labels, const at::Tensor& cstart, const at::Tensor& csize,
    const at::Tensor& lse_pos, const at::Tensor& lse_neg, double m, double gamma, double lam,
    bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return lse_mix_bwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), grad_pos,
                     grad_neg, lse_pos, lse_neg, lam, anchor_neg, true, CircleMaker{m, gamma})
      .first;
}

std::tuple<at::Tensor, at::Tensor> lifted_metrix_mix_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& cstart,
    const at::Tensor& csize, bool cosine, double pos_margin, double neg_margin, double lam,
    bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return lse_mix_fwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), lam, anchor_neg,
                     LiftedMaker{cosine, pos_margin, neg_margin});
}

at::Tensor lifted_metrix_mix_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& labels, const at::Tensor& cstart, const at::Tensor& csize,
    const at::Tensor& lse_pos, const at::Tensor& lse_neg, bool cosine, double pos_margin,
    double neg_margin, double lam, bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return lse_mix_bwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), grad_pos,
                     grad_neg, lse_pos, lse_neg, lam, anchor_neg, true,
                     LiftedMaker{cosine, pos_margin, neg_margin})
      .first;
}

std::tuple<at::Tensor, at::Tensor> circle_metrix_mix_refs_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& self, double m, double gamma, double lam,
    bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return lse_mix_fwd(c, lam, anchor_neg, CircleMaker{m, gamma});
}

std::tuple<at::Tensor, at::Tensor> circle_metrix_mix_refs_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& r, const at::Tensor& labels, const at::Tensor& ref_labels,
    const at::Tensor& self, const at::Tensor& lse_pos, const at::Tensor& lse_neg,
    double m, double gamma, double lam, bool anchor_neg, int64_t chunk, bool need_dr) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return lse_mix_bwd(c, grad_pos, grad_neg, lse_pos, lse_neg, lam, anchor_neg, need_dr,
                     CircleMaker{m, gamma});
}

std::tuple<at::Tensor, at::Tensor> lifted_metrix_mix_refs_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& self, bool cosine, double pos_margin,
    double neg_margin, double lam, bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return lse_mix_fwd(c, lam, anchor_neg, LiftedMaker{cosine, pos_margin, neg_margin});
}

std::tuple<at::Tensor, at::Tensor> lifted_metrix_mix_refs_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& r, const at::Tensor& labels, const at::Tensor& ref_labels,
    const at::Tensor& self, const at::Tensor& lse_pos, const at::Tensor& lse_neg,
    bool cosine, double pos_margin, double neg_margin, double lam, bool anchor_neg,
    int64_t chunk, bool need_dr) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return lse_mix_bwd(c, grad_pos, grad_neg, lse_pos, lse_neg, lam, anchor_neg, need_dr,
                     LiftedMaker{cosine, pos_margin, neg_margin});
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // CircleLoss's and GeneralizedLiftedStructureLoss's embedding-level Metrix terms on CUDA
  // tensors: unit rows x sorted by label, each row's class start and size; per anchor
  // (lse⁺, lse⁻) of its candidates' exponents, −inf without a candidate. Row chunks of whole
  // classes, about `chunk` rows each. Lifted: cosine margins, else the L2 distance.
  m.def("circle_metrix_mix_fwd(Tensor x, Tensor labels, Tensor class_start, Tensor class_size, "
        "float m, float gamma, float lam, bool anchor_neg, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("circle_metrix_mix_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor labels, "
        "Tensor class_start, Tensor class_size, Tensor lse_pos, Tensor lse_neg, float m, "
        "float gamma, float lam, bool anchor_neg, int chunk) -> Tensor",
        METRIX_HOST_READS);
  m.def("lifted_metrix_mix_fwd(Tensor x, Tensor labels, Tensor class_start, Tensor class_size, "
        "bool cosine, float pos_margin, float neg_margin, float lam, bool anchor_neg, "
        "int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("lifted_metrix_mix_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor labels, "
        "Tensor class_start, Tensor class_size, Tensor lse_pos, Tensor lse_neg, bool cosine, "
        "float pos_margin, float neg_margin, float lam, bool anchor_neg, int chunk) -> Tensor",
        METRIX_HOST_READS);
  // The same against references (ms_metrix_mix_refs_fwd's arguments and chunks)
  m.def("circle_metrix_mix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, float m, float gamma, float lam, bool anchor_neg, int chunk) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("circle_metrix_mix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, "
        "Tensor labels, Tensor ref_labels, Tensor self, Tensor lse_pos, Tensor lse_neg, "
        "float m, float gamma, float lam, bool anchor_neg, int chunk, bool need_dr) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("lifted_metrix_mix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("lifted_metrix_mix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, "
        "Tensor labels, Tensor ref_labels, Tensor self, Tensor lse_pos, Tensor lse_neg, "
        "bool cosine, float pos_margin, float neg_margin, float lam, bool anchor_neg, "
        "int chunk, bool need_dr) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("circle_metrix_mix_fwd", &circle_metrix_mix_fwd_cuda);
  m.impl("circle_metrix_mix_bwd", &circle_metrix_mix_bwd_cuda);
  m.impl("lifted_metrix_mix_fwd", &lifted_metrix_mix_fwd_cuda);
  m.impl("lifted_metrix_mix_bwd", &lifted_metrix_mix_bwd_cuda);
  m.impl("circle_metrix_mix_refs_fwd", &circle_metrix_mix_refs_fwd_cuda);
  m.impl("circle_metrix_mix_refs_bwd", &circle_metrix_mix_refs_bwd_cuda);
  m.impl("lifted_metrix_mix_refs_fwd", &lifted_metrix_mix_refs_fwd_cuda);
  m.impl("lifted_metrix_mix_refs_bwd", &lifted_metrix_mix_refs_bwd_cuda);
}

}  // namespace metrix_ops
