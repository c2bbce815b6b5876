// Fused contrastive loss on the CPU: unit anchors x (B×D) against unit references r (M×D),
// streaming S = x rᵀ in chunks of r; never B×M.
//
// Forward returns, per anchor and per side (positive / negative pairs), the sum and the
// count of the hinge terms the reducer keeps (its window low < t < high): AvgNonZero, Mean,
// Sum and Threshold reductions are ratios of these totals, so no per-pair tensor is needed.
// Backward takes the upstream gradient of each row's two sums, recomputes each chunk of S,
// turns it into G = ∂L/∂S in place, then dx += G r_c and dr_c = Gᵀ x.
#include <torch/library.h>

#include "cpu/contrastive_blocks.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  std::vector<ConAcc> acc(B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_fwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const ConLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
      con_fold_rows<T>(s.data_ptr<T>(), B, len, 0, start, lab, p, acc.data());
    }
  });
  return con_outputs(acc, x.options());
}

std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cpu(
    const at::Tensor& grad_pos_, const at::Tensor& grad_neg_, const at::Tensor& x_,
    const at::Tensor& r_, const at::Tensor& labels_, const at::Tensor& ref_labels_,
    bool exclude_diag, bool cosine, double pos_margin, double neg_margin, double low,
    double high, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_vec(grad_pos_, x_.size(0), "grad_pos");
  check_vec(grad_neg_, x_.size(0), "grad_neg");
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto gp = grad_pos_.to(x.scalar_type()).contiguous();
  auto gn = grad_neg_.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_bwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const ConLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor rc = r.narrow(0, start, len);
      at::Tensor s = at::mm(x, rc.t()).contiguous();  // becomes G in place
      con_grad_block<T>(s.data_ptr<T>(), B, len, 0, start, lab, p, gp.data_ptr<T>(),
                        gn.data_ptr<T>(), nullptr, nullptr);
      dx.addmm_(s, rc);
      dr.narrow(0, start, len).addmm_(s.t(), x);
    }
  });
  return {dx, dr};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Contrastive loss of unit anchors x against unit references r, streamed over r in
  // chunks: per anchor, the sum and count of kept positive terms, then of negative terms.
  // cosine: CosineSimilarity margins, else normalised L2 distance; low/high: the
  // reducer's window on a term (-inf/inf keep all).
  m.def("contrastive_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "bool exclude_diag, bool cosine, float pos_margin, float neg_margin, float low, "
        "float high, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, Tensor labels, "
        "Tensor ref_labels, bool exclude_diag, bool cosine, float pos_margin, "
        "float neg_margin, float low, float high, int chunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("contrastive_fwd", &contrastive_fwd_cpu);
  m.impl("contrastive_bwd", &contrastive_bwd_cpu);
}

}  // namespace metrix_ops
