// Fused multi-similarity loss on the CPU: per-anchor loss terms of unit anchors x (B×D)
// against unit references r (M×D), streaming S = x rᵀ in chunks of r; never B×M.
//
// Forward keeps only each row's two log-sum-exps; backward recomputes each chunk of S and
// turns it into the chunk of G = ∂L/∂S, then dx += G r_c and dr_c = Gᵀ x. Recomputing costs
// one extra chunk product (4 products in all against the floor of 3: S, G r, Gᵀ x); keeping
// S or G instead would be the B×M memory this op exists to avoid.
#include <torch/library.h>

#include "cpu/ms_blocks.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_loss_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::zeros({B}, x.options()), lse_neg = at::zeros({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    const BlockLabels lab{ids.first.data_ptr<int32_t>(), ids.second.data_ptr<int32_t>(), exclude_diag};
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
      ms_fold_block<T>(s.data_ptr<T>(), B, len, 0, start, lab, T(alpha), T(beta), T(base),
                       pos.data(), neg.data());
    }
    ms_finish_rows<T>(pos, neg, T(alpha), T(beta), rows, lse_pos, lse_neg);
  });
  return {rows, lse_pos, lse_neg};
}

std::tuple<at::Tensor, at::Tensor> ms_loss_bwd_cpu(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_vec(grad_rows_, x_.size(0), "grad_rows");
  check_vec(lse_pos_, x_.size(0), "lse_pos");
  check_vec(lse_neg_, x_.size(0), "lse_neg");
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  auto g_rows = grad_rows_.to(x.scalar_type()).contiguous();
  auto lse_pos = lse_pos_.contiguous(), lse_neg = lse_neg_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_bwd_cpu", [&] {
    using T = scalar_t;
    const BlockLabels lab{ids.first.data_ptr<int32_t>(), ids.second.data_ptr<int32_t>(), exclude_diag};
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor rc = r.narrow(0, start, len);
      at::Tensor s = at::mm(x, rc.t()).contiguous();  // becomes G in place
      ms_grad_block<T>(s.data_ptr<T>(), B, len, 0, start, lab, g_rows.data_ptr<T>(),
                       lse_pos.data_ptr<T>(), lse_neg.data_ptr<T>(), T(alpha), T(beta), T(base));
      dx.addmm_(s, rc);
      dr.narrow(0, start, len).addmm_(s.t(), x);
    }
  });
  return {dx, dr};
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_loss_fwd", &ms_loss_fwd_cpu);
  m.impl("ms_loss_bwd", &ms_loss_bwd_cpu);
}

}  // namespace metrix_ops
