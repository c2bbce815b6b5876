// Fused contrastive loss on the CPU: unit anchors x (B×D) against unit references r (M×D),
// streaming S = x rᵀ in chunks of r; never B×M.
//
// Forward returns, per anchor and per side (positive / negative pairs), the sum and the
// count of the hinge terms the reducer keeps (its window low < t < high): AvgNonZero, Mean,
// Sum and Threshold reductions are ratios of these totals, so no per-pair tensor is needed.
// Backward takes the upstream gradient of each row's two sums, recomputes each chunk of S,
// turns it into G = ∂L/∂S in place, then dx += G r_c and dr_c = Gᵀ x.
//
// raw: x and r are rows of any norm (LpDistance(normalize_embeddings=False)); each chunk of
// S is rewritten as 1 − d²/2 (sym_blocks.h: raw_to_unit_sims_of), so the fold and G are the
// unit-row code, and the backward adds d²'s radial part, −(G 1)·x and −(Gᵀ 1)·r_c.
#include <torch/library.h>

#include "cpu/contrastive_blocks.h"
#include "cpu/sym_blocks.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t chunk, bool raw) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  std::vector<ConAcc> acc(B);
  const at::Tensor sqx = raw ? sq_norms(x) : at::Tensor(), sqr = raw ? sq_norms(r) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_fwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const ConLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
      if (raw)
        raw_to_unit_sims_of<T>(s.data_ptr<T>(), B, len, sqx.data_ptr<T>(),
                               sqr.data_ptr<T>() + start, x.size(1));
      con_fold_rows<T>(s.data_ptr<T>(), B, len, 0, start, lab, p, acc.data());
    }
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
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  const at::Tensor sqx = raw ? sq_norms(x) : at::Tensor(), sqr = raw ? sq_norms(r) : at::Tensor();
  // raw: Σ_j G_ij over the chunks, for dx's radial part at the end
  at::Tensor gsum = raw ? at::zeros({x.size(0), 1}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_bwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const ConLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor rc = r.narrow(0, start, len);
      at::Tensor s = at::mm(x, rc.t()).contiguous();  // becomes G in place
      if (raw)
        raw_to_unit_sims_of<T>(s.data_ptr<T>(), B, len, sqx.data_ptr<T>(),
                               sqr.data_ptr<T>() + start, x.size(1));
      con_grad_block<T>(s.data_ptr<T>(), B, len, 0, start, lab, p, gp.data_ptr<T>(),
                        gn.data_ptr<T>(), nullptr, nullptr);
      dx.addmm_(s, rc);
      at::Tensor drc = dr.narrow(0, start, len);
      drc.addmm_(s.t(), x);
      if (raw) {  // ∂s̃_ij/∂r_j = x_i − r_j: less (Σ_i G_ij)·r_j
        drc.addcmul_(s.sum(0).unsqueeze(1), rc, -1);
        gsum.add_(s.sum(1, true));
      }
    }
  });
  if (raw) dx.addcmul_(gsum, x, -1);  // ∂s̃_ij/∂x_i = r_j − x_i: less (Σ_j G_ij)·x_i
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
