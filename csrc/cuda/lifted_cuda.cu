// CUDA implementation of the fused GeneralizedLiftedStructureLoss ops (the schemas of
// csrc/cpu/lifted_cpu.cpp's gen_lifted_fwd/bwd, so one Python glue serves both devices), on
// the row-chunk engine of cuda/pair_rows.cuh: per row the log-sum-exps of PML's margin
// exponents on each side, loss [lse⁺ + lse⁻]₊ with an empty side adding 0. Per-pair math:
// common/lifted.h, the header the CPU op uses.
#include <torch/library.h>

#include "common/lifted.h"
#include "cuda/pair_rows.cuh"

namespace metrix_ops {

namespace {

template <typename T>
struct GenLiftedRowLoss {
  using State = cuda_pairs::TwoSideLse<T>;
  bool cosine;
  T pos_margin, neg_margin;
  const T* g_rows = nullptr;  // backward: ∂L/∂row and the rows' side log-sum-exps
  const T* lse_pos = nullptr;
  const T* lse_neg = nullptr;

  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    const T t = lifted_dist(s, cosine);
    if (pos) st.pos.push(lifted_pos_arg(t, cosine, pos_margin));
    else st.neg.push(lifted_neg_arg(t, cosine, neg_margin));
  }
  // the row's loss from its finished log-sum-exps: [lse⁺ + lse⁻]₊, an empty side adding 0
  __device__ T finish(T lp, T ln) const {
    const T pre = gen_lifted_pre(lp, ln);
    return pre > T(0) ? pre : T(0);
  }
  __device__ T grad(T s, bool pos, int64_t i) const {
    return gen_lifted_grad(s, pos, cosine, pos_margin, neg_margin, g_rows[i], lse_pos[i],
                           lse_neg[i]);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_lifted_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk) {
  return cuda_pairs::two_side_fwd(x, r, labels, ref_labels, exclude_diag, chunk,
                                  [&](auto g, auto lp, auto ln) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return GenLiftedRowLoss<T>{cosine, T(pos_margin), T(neg_margin), g, lp, ln};
  });
}

std::tuple<at::Tensor, at::Tensor> gen_lifted_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk) {
  return cuda_pairs::two_side_bwd(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg,
                                  exclude_diag, chunk, true,
                                  [&](auto g, auto lp, auto ln) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return GenLiftedRowLoss<T>{cosine, T(pos_margin), T(neg_margin), g, lp, ln};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("gen_lifted_fwd", &gen_lifted_fwd_cuda);
  m.impl("gen_lifted_bwd", &gen_lifted_bwd_cuda);
}

}  // namespace metrix_ops
