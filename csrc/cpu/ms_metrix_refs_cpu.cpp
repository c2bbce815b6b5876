// The multi-similarity loss with its embedding-level Metrix term (pairs "pos_neg" or
// "anchor_neg", DESIGN §3) of anchors against references (`ref_emb`, a memory bank): the
// walk of metrix_refs_walk.h with the in-batch op's kernels (ms_metrix_kernels.h), the clean
// terms on the same rows of S. `clean` off: the mixed term alone (beside a clean loss that
// another path computes, e.g. on an indices_tuple).
#include <torch/library.h>

#include "cpu/metrix_refs_walk.h"
#include "cpu/ms_blocks.h"
#include "cpu/ms_metrix_rows.h"

namespace metrix_ops {

namespace {

// The clean MS terms of a class tile's anchor rows (rows of S = X Rᵀ against a chunk of R's
// columns, the anchor's own slot skipped): the same kernels as the clean op, on the rows the walk has
// computed anyway, so the clean loss against references costs no product of its own.
template <typename T>
MsBlock<T> clean_rows_block(const MixGeom<T>& geo, int64_t a0, const T* g, const T* lp,
                            const T* ln, T alpha, T beta, T base, const int64_t* own) {
  MsBlock<T> b{geo.nc, a0, geo.c0, geo.row_lab, geo.col_lab, false, alpha, beta, base, g, lp,
               ln};
  b.skip_col = own;
  return b;
}

// anchor a0's row of S in the walk's rows
template <typename T, typename P>
P* anchor_rows(const MixGeom<T>& geo, P* base, int64_t a0) {
  return base + (a0 - geo.r0) * geo.nc;
}

}  // namespace

// (clean rows, their lse⁺, lse⁻, mixed rows ℓ̃(a), their two log normalisers) per anchor of
// the label-sorted unit rows x against the label-sorted unit references r
SixTensors ms_metrix_refs_fwd_cpu(const at::Tensor& x_, const at::Tensor& r_,
                                  const at::Tensor& labels_, const at::Tensor& ref_labels_,
                                  const at::Tensor& self_, double alpha, double beta,
                                  double base, double lam, bool anchor_neg, bool clean,
                                  int64_t group) {
  RefsCall c(x_, r_, labels_, ref_labels_, self_, lam, group);
  const at::Tensor& x = c.x;
  const int64_t B = x.size(0);
  auto vec = [&] { return at::zeros({B}, x.options()); };
  at::Tensor rows = vec(), lse_pos = vec(), lse_neg = vec(), mix = vec(), tp = vec(), tn = vec();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    std::vector<OnlineLse<T>> mpos(B, OnlineLse<T>::empty()), mneg(B, OnlineLse<T>::empty());
    const MsMix<T> mm{T(alpha), T(beta), T(base)};
    const auto& k = ms_kernels<T>();
    const int64_t* op = c.own.data_ptr<int64_t>();
    c.fold<T>(lam, anchor_neg, [&](const MixGeom<T>& geo) {
      return [&, b = mm.side(geo), geo](int64_t a0, int64_t a1) {
        k.mix_fold(b, a0, a1, mpos.data(), mneg.data());
        if (clean)
          k.fold(anchor_rows(geo, geo.s, a0), 0, a1 - a0,
                 clean_rows_block<T>(geo, a0, nullptr, nullptr, nullptr, T(alpha),
                                     T(beta), T(base), op),
                 pos.data(), neg.data());
      };
    });
    if (clean) ms_finish_rows<T>(pos, neg, T(alpha), T(beta), rows, lse_pos, lse_neg);
    finish_mixed<T>(mpos, mneg, T(lam), T(alpha), T(beta), mix, tp, tn);
  });
  return {rows, lse_pos, lse_neg, mix, tp, tn};
}

std::tuple<at::Tensor, at::Tensor> ms_metrix_refs_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& grad_mix, const at::Tensor& x_,
    const at::Tensor& r_, const at::Tensor& labels_, const at::Tensor& ref_labels_,
    const at::Tensor& self_, const at::Tensor& lse_pos_, const at::Tensor& lse_neg_,
    const at::Tensor& tp_, const at::Tensor& tn_, double alpha, double beta, double base,
    double lam, bool anchor_neg, bool clean, int64_t group, bool need_dr) {
  RefsCall c(x_, r_, labels_, ref_labels_, self_, lam, group);
  const at::Tensor& x = c.x;
  const auto v = row_vectors(x, {{&grad_rows, "grad_rows"}, {&grad_mix, "grad_mix"},
                                 {&lse_pos_, "lse_pos"}, {&lse_neg_, "lse_neg"}, {&tp_, "tp"},
                                 {&tn_, "tn"}});
  const at::Tensor &g = v[0], &gmix = v[1], &lse_pos = v[2], &lse_neg = v[3], &tp = v[4],
                   &tn = v[5];
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    MsMix<T> mm{T(alpha), T(beta), T(base)};
    mm.g = gmix.data_ptr<T>();
    mm.tp = tp.data_ptr<T>();
    mm.tn = tn.data_ptr<T>();
    const auto& k = ms_kernels<T>();
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    const int64_t* op = c.own.data_ptr<int64_t>();
    out = c.grad<T>(lam, anchor_neg, need_dr, [&](const MixGeom<T>& geo) {
      return [&, b = mm.side(geo), geo](int64_t a0, int64_t a1) {
        k.mix_grad(b, a0, a1);
        if (!clean) return;
        // the anchors' rows of S, read by the mixed kernel above and by nothing else,
        // become their clean G in place, which is added to the tile's ∂L/∂S
        T* s = anchor_rows(geo, const_cast<T*>(geo.s), a0);
        T* gm = anchor_rows(geo, geo.gm, a0);
        k.grad(s, 0, a1 - a0, clean_rows_block<T>(geo, a0, gp, lp, ln, T(alpha), T(beta),
                                                  T(base), op));
        const int64_t n = (a1 - a0) * geo.nc;
        for (int64_t e = 0; e < n; ++e) gm[e] += s[e];
      };
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // MS and its Metrix term (pos_neg, or anchor_neg) for label-sorted unit anchors x against
  // label-sorted unit references r; self[a] is anchor a's own row of r (−1: none), which is
  // neither a pair nor a positive: (clean rows, their lse⁺, lse⁻ — zeros unless clean —,
  // mixed rows ℓ̃(a), 0 without a candidate, their two log normalisers). The classes go in
  // groups whose tiles hold about `group` entries each (one class at least).
  m.def("ms_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, Tensor self, "
        "float alpha, float beta, float base, float lam, bool anchor_neg, bool clean, "
        "int group) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ms_metrix_refs_bwd(Tensor grad_rows, Tensor grad_mix, Tensor x, Tensor r, "
        "Tensor labels, Tensor ref_labels, Tensor self, Tensor lse_pos, Tensor lse_neg, "
        "Tensor tp, Tensor tn, float alpha, float beta, float base, float lam, bool anchor_neg, "
        "bool clean, int group, bool need_dr) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_metrix_refs_fwd", &ms_metrix_refs_fwd_cpu);
  m.impl("ms_metrix_refs_bwd", &ms_metrix_refs_bwd_cpu);
}

}  // namespace metrix_ops
