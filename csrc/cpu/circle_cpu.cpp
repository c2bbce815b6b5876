// Fused CircleLoss on the CPU: unit anchors x (B×D) against unit references r (M×D),
// streaming S = x rᵀ in chunks of anchors (cpu/row_tiles.h); never B×M.
//
// Forward gives per anchor its loss (0 without a positive or without a negative, as PML)
// and the log-sum-exps of its two sides, which the backward reuses (circle_rows.h).
#include <cmath>
#include <limits>

#include <torch/library.h>

#include "cpu/circle_rows.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> circle_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, double m, double gamma, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::empty({B}, x.options()), lse_neg = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_fwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab = pair_labels(ids, exclude_diag, M);
    const auto c = circle_consts<T>(m, gamma);
    T *out = rows.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    for_each_sim_row<T>(x, r, chunk, [&](const T* s, int64_t i, T* u) {
      OnlineLse<T> pos = OnlineLse<T>::empty(), neg = OnlineLse<T>::empty();
      circle_fold_piece(s, M, lab.row[i], lab.col, lab.skip(i), c, u, pos, neg);
      lp[i] = pos.value();  // −inf for an empty side
      ln[i] = neg.value();
      out[i] = circle_row_loss(lp[i], ln[i]);
    });
  });
  return {rows, lse_pos, lse_neg};
}

std::tuple<at::Tensor, at::Tensor> circle_bwd_cpu(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, double m, double gamma, int64_t chunk,
    bool need_dr) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  const int64_t B = x_.size(0), M = r_.size(0);
  check_vec(grad_rows_, B, "grad_rows");
  check_vec(lse_pos_, B, "lse_pos");
  check_vec(lse_neg_, B, "lse_neg");
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  auto g = grad_rows_.to(x.scalar_type()).contiguous();
  auto lse_pos = lse_pos_.to(x.scalar_type()).contiguous();
  auto lse_neg = lse_neg_.to(x.scalar_type()).contiguous();
  at::Tensor dx, dr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_bwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab = pair_labels(ids, exclude_diag, M);
    const auto c = circle_consts<T>(m, gamma);
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    std::tie(dx, dr) = sim_rows_backward<T>(x, r, chunk, need_dr, [&](T* s, int64_t i, T* u) {
      circle_grad_piece(s, M, lab.row[i], lab.col, lab.skip(i), c, gp[i], lp[i], ln[i], u);
    });
  });
  return {dx, dr};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // CircleLoss rows of unit anchors x against unit references r (exclude_diag: r is the batch
  // and pair (i, i) is no pair), streamed over x in chunks of `chunk` rows: per anchor,
  // softplus(lse⁺ + lse⁻) (0 when a side is empty), lse⁺ and lse⁻ (−inf when empty).
  m.def("circle_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, bool exclude_diag, "
        "float m, float gamma, int chunk) -> (Tensor, Tensor, Tensor)");
  m.def("circle_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor lse_pos, Tensor lse_neg, bool exclude_diag, float m, float gamma, int chunk, "
        "bool need_dr) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("circle_fwd", &circle_fwd_cpu);
  m.impl("circle_bwd", &circle_bwd_cpu);
}

}  // namespace metrix_ops
