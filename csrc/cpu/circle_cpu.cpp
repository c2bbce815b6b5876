// Fused CircleLoss on the CPU: unit anchors x (B×D) against unit references r (M×D),
// streaming S = x rᵀ in chunks of anchors (cpu/row_tiles.h); never B×M.
//
// Forward gives per anchor its loss (0 without a positive or without a negative, as PML)
// and the log-sum-exps of its two sides (two passes over the row: the maxima, then the
// exponentials at once), which the backward reuses: there each entry of G is one
// exponential, g · softplus'(lse⁺ + lse⁻) · softmax within its side · ∓weight.
#include <cmath>
#include <limits>

#include <torch/library.h>

#include "common/circle.h"
#include "cpu/row_tiles.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> circle_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, double m, double gamma, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::empty({B}, x.options()), lse_neg = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_fwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    const auto c = circle_consts<T>(m, gamma);
    T *out = rows.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    const T ninf = -std::numeric_limits<T>::infinity();
    for_each_sim_row<T>(x, r, chunk, [&](const T* s, int64_t i, T* u) {
      T mp = ninf, mn = ninf;  // each side's max logit
      for (int64_t j = 0; j < M; ++j) {
        if (lab.pos(i, j)) {
          u[j] = circle_pos_logit(s[j], c);
          mp = std::max(mp, u[j]);
        } else if (lab.neg(i, j)) {
          u[j] = circle_neg_logit(s[j], c);
          mn = std::max(mn, u[j]);
        } else {
          u[j] = ninf;
        }
      }
      for (int64_t j = 0; j < M; ++j) u[j] -= lab.pos(i, j) ? mp : (lab.neg(i, j) ? mn : T(0));
      exp_row(u, M);
      T sp = T(0), sn = T(0);  // a non-pair's 0 may land in sn
      for (int64_t j = 0; j < M; ++j) (lab.pos(i, j) ? sp : sn) += u[j];
      lp[i] = sp > T(0) ? mp + std::log(sp) : ninf;  // −inf for an empty side
      ln[i] = sn > T(0) ? mn + std::log(sn) : ninf;
      if (sp > T(0) && sn > T(0)) out[i] = softplus20(lp[i] + ln[i]);
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
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows_.to(x.scalar_type()).contiguous();
  auto lse_pos = lse_pos_.to(x.scalar_type()).contiguous();
  auto lse_neg = lse_neg_.to(x.scalar_type()).contiguous();
  at::Tensor dx, dr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "circle_bwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    const auto c = circle_consts<T>(m, gamma);
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    const T ninf = -std::numeric_limits<T>::infinity();
    std::tie(dx, dr) = sim_rows_backward<T>(x, r, chunk, need_dr, [&](T* s, int64_t i, T* u) {
      const T lpi = lp[i], lni = ln[i];
      if (lpi == ninf || lni == ninf) {  // a side is empty: the anchor's loss is 0
        std::fill(s, s + M, T(0));
        return;
      }
      const T gi = gp[i] * softplus20_grad(lpi + lni);
      for (int64_t j = 0; j < M; ++j) {  // softmax within the side × ∓weight
        const T v = s[j];
        if (lab.pos(i, j)) {
          u[j] = circle_pos_logit(v, c) - lpi;
          s[j] = -gi * circle_pos_weight(v, c);
        } else if (lab.neg(i, j)) {
          u[j] = circle_neg_logit(v, c) - lni;
          s[j] = gi * circle_neg_weight(v, c);
        } else {
          u[j] = ninf;
          s[j] = T(0);
        }
      }
      exp_row(u, M);
      for (int64_t j = 0; j < M; ++j) s[j] *= u[j];
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
