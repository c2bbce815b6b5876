// Fused CircleLoss of a batch against itself (no ref_emb: the common case) on the CPU: the
// blocks I <= J of the symmetric S = x xᵀ once (self_walk.h), each block's rows folded into
// the anchors' two online log-sum-exps and, off the diagonal, its transposed copy into the
// column anchors'. The general op (circle_cpu.cpp) streams whole rows: 1 product forward and
// 3 backward where this takes ½ and 1½, with the same per-pair exponentials.
//
// A piece of a row (columns c0..c0+nc; its self pair at gi − c0) is folded, and turned into
// its piece of G, as the general op does a whole row (circle_rows.h).
#include <torch/library.h>

#include <vector>

#include "cpu/circle_rows.h"
#include "cpu/self_walk.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> circle_self_fwd_cpu(const at::Tensor& x_,
                                                                   const at::Tensor& labels,
                                                                   double m, double gamma,
                                                                   int64_t block) {
  check_self_inputs(x_, labels, block);
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  const int64_t B = x.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::empty({B}, x.options()), lse_neg = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_self_fwd_cpu", [&] {
    using T = scalar_t;
    const auto c = circle_consts<T>(m, gamma);
    const int32_t* id = ids.data_ptr<int32_t>();
    std::vector<OnlineLse<T>> pos(B, OnlineLse<T>::empty()), neg(B, OnlineLse<T>::empty());
    walk_rows<T>(Walk{x, x, true, block}, [&](const T* s, int64_t nc, int64_t gi, int64_t c0) {
      circle_fold_piece(s, nc, id[gi], id + c0, gi - c0, c, scratch_row<T>(nc), pos[gi],
                        neg[gi]);
    });
    T *out = rows.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      lp[i] = pos[i].value();  // −inf for an empty side
      ln[i] = neg[i].value();
      out[i] = circle_row_loss(lp[i], ln[i]);
    }
  });
  return {rows, lse_pos, lse_neg};
}

at::Tensor circle_self_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x_,
                               const at::Tensor& labels, const at::Tensor& lse_pos_,
                               const at::Tensor& lse_neg_, double m, double gamma,
                               int64_t block) {
  check_self_inputs(x_, labels, block);
  auto x = x_.contiguous();
  const auto v = row_vectors(x, {{&grad_rows, "grad_rows"}, {&lse_pos_, "lse_pos"},
                                 {&lse_neg_, "lse_neg"}});
  const at::Tensor ids = ms_label_ids(labels);
  at::Tensor dx = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_self_bwd_cpu", [&] {
    using T = scalar_t;
    const auto c = circle_consts<T>(m, gamma);
    const int32_t* id = ids.data_ptr<int32_t>();
    const T *g = v[0].data_ptr<T>(), *lp = v[1].data_ptr<T>(), *ln = v[2].data_ptr<T>();
    walk_grad<T>(Walk{x, x, true, block}, dx, dx, [&](T* s, int64_t nc, int64_t i, int64_t c0) {
      circle_grad_piece(s, nc, id[i], id + c0, i - c0, c, g[i], lp[i], ln[i],
                        scratch_row<T>(nc));
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // circle_fwd/circle_bwd of the batch against itself (self pairs excluded) over the
  // symmetric blocks of S, `block` rows each: per anchor softplus(lse⁺ + lse⁻), lse⁺, lse⁻
  m.def("circle_self_fwd(Tensor x, Tensor labels, float m, float gamma, int block) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("circle_self_bwd(Tensor grad_rows, Tensor x, Tensor labels, Tensor lse_pos, "
        "Tensor lse_neg, float m, float gamma, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("circle_self_fwd", &circle_self_fwd_cpu);
  m.impl("circle_self_bwd", &circle_self_bwd_cpu);
}

}  // namespace metrix_ops
