// Fused contrastive loss on the CPU: unit anchors x (B×D) against unit references r (M×D),
// streaming S = x rᵀ in chunks of r; never B×M.
//
// Forward returns, per anchor and per side (positive / negative pairs), the sum and the
// count of the hinge terms the reducer keeps (its window low < t < high): AvgNonZero, Mean,
// Sum and Threshold reductions are ratios of these totals, so no per-pair tensor is needed.
// Backward takes the upstream gradient of each row's two sums, recomputes each chunk of S,
// turns it into G = ∂L/∂S in place, then dx += G r_c and dr_c = Gᵀ x. Both are the general
// walk of self_walk.h, row by row.
//
// raw: x and r are rows of any norm (LpDistance(normalize_embeddings=False)); the walk hands
// each chunk of S on as 1 − d²/2, so the fold and G are the unit-row code, and adds d²'s
// radial part to the gradient.
#include <torch/library.h>

#include "cpu/contrastive_blocks.h"
#include "cpu/self_walk.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t chunk, bool raw) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  std::vector<ConAcc> acc(x.size(0));
  const Walk walk{x, r, false, chunk, raw ? walk_norms(x, r, false) : at::Tensor()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_fwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const ConLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    walk_rows<T>(walk, [&](const T* row, int64_t nc, int64_t gi, int64_t c0) {
      con_fold_row(row, nc, gi, c0, lab, p, acc.data());
    });
  });
  return con_outputs(acc, x.options());
}

std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cpu(
    const at::Tensor& grad_pos_, const at::Tensor& grad_neg_, const at::Tensor& x_,
    const at::Tensor& r_, const at::Tensor& labels_, const at::Tensor& ref_labels_,
    bool exclude_diag, bool cosine, double pos_margin, double neg_margin, double low,
    double high, int64_t chunk, bool raw) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_vec(grad_pos_, x_.size(0), "grad_pos");
  check_vec(grad_neg_, x_.size(0), "grad_neg");
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto gp = grad_pos_.to(x.scalar_type()).contiguous();
  auto gn = grad_neg_.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  const Walk walk{x, r, false, chunk, raw ? walk_norms(x, r, false) : at::Tensor()};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_bwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const ConLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    const T *gpp = gp.data_ptr<T>(), *gnp = gn.data_ptr<T>();
    walk_grad<T>(walk, dx, dr, [&](T* row, int64_t nc, int64_t gi, int64_t c0) {
      con_grad_row(row, nc, gi, c0, lab, p, gpp, gnp, (const T*)nullptr, (const T*)nullptr);
    });
  });
  return {dx, dr};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Contrastive loss of unit anchors x against unit references r, streamed over r in
  // chunks: per anchor, the sum and count of kept positive terms, then of negative terms.
  // cosine: CosineSimilarity margins, else normalised L2 distance; low/high: the
  // reducer's window on a term (-inf/inf keep all). raw: rows of any norm, their L2
  // distance (or its square, through cosine at moved margins); CPU only.
  m.def("contrastive_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "bool exclude_diag, bool cosine, float pos_margin, float neg_margin, float low, "
        "float high, int chunk, bool raw=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, Tensor labels, "
        "Tensor ref_labels, bool exclude_diag, bool cosine, float pos_margin, "
        "float neg_margin, float low, float high, int chunk, bool raw=False) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("contrastive_fwd", &contrastive_fwd_cpu);
  m.impl("contrastive_bwd", &contrastive_bwd_cpu);
}

}  // namespace metrix_ops
