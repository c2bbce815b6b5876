// CircleLoss's embedding-level Metrix term (pairs "pos_neg" or "anchor_neg", DESIGN §3) of a
// label-sorted batch against itself, as its two per-anchor log-sum-exps over the mixed
// candidates (lse_mix_self.h), and with `clean` the clean loss's two from the same blocks;
// the λ weights, softplus and reductions are in metrix_ops/ops/circle_metrix.py.
#include <torch/library.h>

#include "cpu/lse_mix_self.h"

namespace metrix_ops {

using FourTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FourTensors circle_metrix_self_fwd_cpu(const at::Tensor& x_, const at::Tensor& labels, double m,
                                       double gamma, double lam, bool anchor_neg, bool clean,
                                       int64_t block) {
  check_lse_mix(x_, labels, lam, block);
  const at::Tensor x = x_.contiguous();
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_metrix_self_fwd_cpu", [&] {
    using T = scalar_t;
    const auto& k = lse_mix_kernels<T>();
    out = lse_mix_fwd<T, CircleConsts<T>>(x, labels, circle_consts<T>(m, gamma), lam,
                                           anchor_neg, block, clean, k.circle_fold,
                                           k.circle_clean_fold);
  });
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor circle_metrix_self_bwd_cpu(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                      const at::Tensor& grad_clean_pos,
                                      const at::Tensor& grad_clean_neg, const at::Tensor& x_,
                                      const at::Tensor& labels, const at::Tensor& lse_pos,
                                      const at::Tensor& lse_neg, const at::Tensor& clean_pos,
                                      const at::Tensor& clean_neg, double m, double gamma,
                                      double lam, bool anchor_neg, bool clean, int64_t block) {
  check_lse_mix(x_, labels, lam, block);
  const at::Tensor x = x_.contiguous();
  const auto v = lse_bwd_vectors(x, {grad_pos, grad_neg, lse_pos, lse_neg, grad_clean_pos,
                                     grad_clean_neg, clean_pos, clean_neg});
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_metrix_self_bwd_cpu", [&] {
    using T = scalar_t;
    const auto& k = lse_mix_kernels<T>();
    dx = lse_mix_bwd<T, CircleConsts<T>>(x, labels, circle_consts<T>(m, gamma), lam, anchor_neg,
                                         block, clean, k.circle_grad, k.circle_clean_grad, v);
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Per anchor a of a label-sorted batch of unit rows against itself, over its Metrix
  // candidates v = mix(p, n, lam) (p a positive of a, or a itself when it has none or with
  // anchor_neg; n a negative): (log Σ_v e^{−γ[O_p − s̃]₊(s̃ − Δ_p)}, log Σ_v e^{γ[s̃ − O_n]₊(s̃ − Δ_n)}),
  // −inf without a candidate; the weights [·]₊ are constants of the gradient. With `clean`,
  // then the same two over a's clean pairs (circle_fwd's lse⁺, lse⁻; −inf for an empty
  // side), from the same blocks of S; −inf unless clean.
  m.def("circle_metrix_self_fwd(Tensor x, Tensor labels, float m, float gamma, float lam, "
        "bool anchor_neg, bool clean, int block) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("circle_metrix_self_bwd(Tensor grad_pos, Tensor grad_neg, Tensor grad_clean_pos, "
        "Tensor grad_clean_neg, Tensor x, Tensor labels, Tensor lse_pos, Tensor lse_neg, "
        "Tensor clean_pos, Tensor clean_neg, float m, float gamma, float lam, "
        "bool anchor_neg, bool clean, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("circle_metrix_self_fwd", &circle_metrix_self_fwd_cpu);
  m.impl("circle_metrix_self_bwd", &circle_metrix_self_bwd_cpu);
}

}  // namespace metrix_ops
