// GeneralizedLiftedStructureLoss's embedding-level Metrix term (pairs "pos_neg" or
// "anchor_neg", DESIGN §3) of a label-sorted batch against itself, as its two per-anchor
// log-sum-exps over the mixed candidates (lse_mix_self.h); the λ weights, the empty-side
// rule, the hinge and the mean are in metrix_ops/ops/lifted_metrix.py.
#include <torch/library.h>

#include "cpu/lse_mix_self.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor> lifted_metrix_self_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& labels, bool cosine, double pos_margin,
    double neg_margin, double lam, bool anchor_neg, int64_t block) {
  check_lse_mix(x_, labels, lam, block);
  const at::Tensor x = x_.contiguous();
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lifted_metrix_self_fwd_cpu", [&] {
    using T = scalar_t;
    const LiftedMixParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    out = lse_mix_fwd<T, LiftedMixParams<T>>(x, labels, p, lam, anchor_neg, block,
                                              lse_mix_kernels<T>().lifted_fold);
  });
  return {out.first, out.second};
}

at::Tensor lifted_metrix_self_bwd_cpu(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                      const at::Tensor& x_, const at::Tensor& labels,
                                      const at::Tensor& lse_pos, const at::Tensor& lse_neg,
                                      bool cosine, double pos_margin, double neg_margin,
                                      double lam, bool anchor_neg, int64_t block) {
  check_lse_mix(x_, labels, lam, block);
  const at::Tensor x = x_.contiguous();
  const auto v = row_vectors(x, {{&grad_pos, "grad_pos"}, {&grad_neg, "grad_neg"},
                                         {&lse_pos, "lse_pos"}, {&lse_neg, "lse_neg"}});
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lifted_metrix_self_bwd_cpu", [&] {
    using T = scalar_t;
    const LiftedMixParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    dx = lse_mix_bwd<T, LiftedMixParams<T>>(x, labels, p, lam, anchor_neg, block,
                                            lse_mix_kernels<T>().lifted_grad, v[0], v[1], v[2],
                                            v[3]);
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Per anchor a of a label-sorted batch of unit rows against itself, over its Metrix
  // candidates v = mix(p, n, lam) (as circle_metrix_self_fwd): (log Σ_v e^{pos(v)},
  // log Σ_v e^{neg(v)}) with PML's lifted exponents (L2: d − pos_margin, neg_margin − d,
  // d = 0 below rounding noise; cosine: pos_margin − s̃, s̃ − neg_margin), −inf without a
  // candidate.
  m.def("lifted_metrix_self_fwd(Tensor x, Tensor labels, bool cosine, float pos_margin, "
        "float neg_margin, float lam, bool anchor_neg, int block) -> (Tensor, Tensor)");
  m.def("lifted_metrix_self_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor labels, "
        "Tensor lse_pos, Tensor lse_neg, bool cosine, float pos_margin, float neg_margin, "
        "float lam, bool anchor_neg, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("lifted_metrix_self_fwd", &lifted_metrix_self_fwd_cpu);
  m.impl("lifted_metrix_self_bwd", &lifted_metrix_self_bwd_cpu);
}

}  // namespace metrix_ops
