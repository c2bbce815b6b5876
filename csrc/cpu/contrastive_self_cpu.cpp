// Fused contrastive loss of a batch against itself (no ref_emb: the common case).
// S = X Xᵀ is symmetric and so is each pair's term (same s, same side), so only blocks
// I ≤ J are computed: an off-diagonal block feeds the sums of its rows and its columns in
// one pass. Backward forms H = G_IJ + G_JIᵀ directly (entry (i, j) is (g_i + g_j)·t'(s_ij))
// and adds H X_J to dX_I and Hᵀ X_I to dX_J: 2·B²·D multiply-adds in all (½ forward,
// ½ + 1 backward) against the 3·B²·D of forming S, G R and Gᵀ X once each.
//
// raw: the rows have any norm (LpDistance(normalize_embeddings=False)). Each block of
// X Xᵀ is rewritten as 1 − d²/2 (sym_blocks.h: raw_to_unit_sims), so the fold and the
// gradient block are the unit rows' code; the backward adds d²'s radial part.
#include <torch/library.h>

#include "cpu/contrastive_blocks.h"
#include "cpu/sym_blocks.h"

namespace metrix_ops {


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_self_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& labels_, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t block, bool raw) {
  check_self_inputs(x_, labels_, block);
  auto x = x_.contiguous();
  auto labels = labels_.contiguous();
  const int64_t B = x.size(0);
  const at::Tensor sq = raw ? sq_norms(x) : at::Tensor();
  std::vector<ConAcc> acc(B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_self_fwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const int64_t* ids = labels.data_ptr<int64_t>();
    const T* sqp = raw ? sq.data_ptr<T>() : nullptr;
    for_upper_blocks(x, block, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      if (raw) raw_to_unit_sims<T>(s.data_ptr<T>(), nr, nc, r0, c0, sqp, x.size(1));
      if (c0 == r0)  // holds both (i, j) and (j, i): rows only, self pairs out
        con_fold_rows<T>(s.data_ptr<T>(), nr, nc, r0, c0, ConLabels{ids, ids, true}, p,
                         acc.data());
      else
        con_fold_sym<T>(s.data_ptr<T>(), nr, nc, r0, c0, ids, p, acc.data());
    });
  });
  return con_outputs(acc, x.options());
}

at::Tensor contrastive_self_bwd_cpu(const at::Tensor& grad_pos_, const at::Tensor& grad_neg_,
                                    const at::Tensor& x_, const at::Tensor& labels_,
                                    bool cosine, double pos_margin, double neg_margin,
                                    double low, double high, int64_t block, bool raw) {
  check_self_inputs(x_, labels_, block);
  check_vec(grad_pos_, x_.size(0), "grad_pos");
  check_vec(grad_neg_, x_.size(0), "grad_neg");
  auto x = x_.contiguous();
  auto labels = labels_.contiguous();
  auto gp = grad_pos_.to(x.scalar_type()).contiguous();
  auto gn = grad_neg_.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::zeros_like(x);
  const at::Tensor sq = raw ? sq_norms(x) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_self_bwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const int64_t* ids = labels.data_ptr<int64_t>();
    const ConLabels lab{ids, ids, true};
    const T *gpp = gp.data_ptr<T>(), *gnp = gn.data_ptr<T>();
    const T* sqp = raw ? sq.data_ptr<T>() : nullptr;
    for_upper_blocks(x, block, [&](at::Tensor& h, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      if (raw) raw_to_unit_sims<T>(h.data_ptr<T>(), nr, nc, r0, c0, sqp, x.size(1));
      con_grad_block<T>(h.data_ptr<T>(), nr, nc, r0, c0, lab, p, gpp, gnp, gpp, gnp);  // h = H
      add_sym_block_grad(dx, x, h, r0, nr, c0, nc);
      if (raw) add_sym_block_radial(dx, x, h, r0, nr, c0, nc);
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // contrastive_fwd/bwd of a batch against itself (self pairs excluded), using the
  // symmetry of S: blocks I <= J only.
  // raw: rows of any norm, the L2 distance (or its square, through cosine) of the rows.
  m.def("contrastive_self_fwd(Tensor x, Tensor labels, bool cosine, float pos_margin, "
        "float neg_margin, float low, float high, int block, bool raw=False) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_self_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor labels, "
        "bool cosine, float pos_margin, float neg_margin, float low, float high, int block, "
        "bool raw=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("contrastive_self_fwd", &contrastive_self_fwd_cpu);
  m.impl("contrastive_self_bwd", &contrastive_self_bwd_cpu);
}

}  // namespace metrix_ops
