// Fused multi-similarity loss of a batch against itself (no ref_emb: the common case).
// S = X Xᵀ is symmetric, so only blocks I ≤ J are computed and each serves both its rows
// (I against J) and, transposed, the rows of J against I. In backward, with
// H = G_IJ + G_JIᵀ, dX_I += H X_J and dX_J += Hᵀ X_I. That is 2·B²·D multiply-adds in all
// (½ forward, ½ + 1 backward) against 4·B²·D for the general op, below the 3·B²·D of a
// method that forms S, G R and Gᵀ X once each.
#include <torch/library.h>

#include "cpu/ms_blocks.h"
#include "cpu/sym_blocks.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_loss_self_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& labels_, double alpha, double beta, double base,
    int64_t block) {
  check_self_inputs(x_, labels_, block);
  auto x = x_.contiguous();
  const at::Tensor labels = ms_label_ids(labels_);
  const int64_t B = x.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::zeros({B}, x.options()), lse_neg = at::zeros({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_self_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    const int32_t* lab_ids = labels.data_ptr<int32_t>();
    const BlockLabels lab{lab_ids, lab_ids, true};
    const T a = alpha, bt = beta, bs = base;
    for_upper_blocks(x, block, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      // an off-diagonal block also serves the rows of J, down its columns
      ms_fold_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, a, bt, bs, pos.data(), neg.data(),
                       /*cols=*/c0 != r0);
    });
    ms_finish_rows<T>(pos, neg, a, bt, rows, lse_pos, lse_neg);
  });
  return {rows, lse_pos, lse_neg};
}

at::Tensor ms_loss_self_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x_,
                                const at::Tensor& labels_, const at::Tensor& lse_pos_,
                                const at::Tensor& lse_neg_, double alpha, double beta,
                                double base, int64_t block) {
  check_self_inputs(x_, labels_, block);
  check_vec(grad_rows, x_.size(0), "grad_rows");
  check_vec(lse_pos_, x_.size(0), "lse_pos");
  check_vec(lse_neg_, x_.size(0), "lse_neg");
  auto x = x_.contiguous();
  const at::Tensor labels = ms_label_ids(labels_);
  auto g = grad_rows.to(x.scalar_type()).contiguous();
  auto lse_pos = lse_pos_.contiguous(), lse_neg = lse_neg_.contiguous();
  at::Tensor dx = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_self_bwd_cpu", [&] {
    using T = scalar_t;
    const int32_t* lab_ids = labels.data_ptr<int32_t>();
    const BlockLabels lab{lab_ids, lab_ids, true};
    const T a = alpha, bt = beta, bs = base;
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    for_upper_blocks(x, block, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      // H = G_IJ + G_JIᵀ straight from s (s_ji = s_ij), no transposed copy; on the
      // diagonal that is G_II + G_IIᵀ, one product
      ms_grad_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, gp, lp, ln, a, bt, bs, /*sym=*/true);
      add_sym_block_grad(dx, x, s, r0, nr, c0, nc);
    });
  });
  return dx;
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_loss_self_fwd", &ms_loss_self_fwd_cpu);
  m.impl("ms_loss_self_bwd", &ms_loss_self_bwd_cpu);
}

}  // namespace metrix_ops
