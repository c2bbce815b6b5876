// The contrastive loss with its embedding-level Metrix term (pairs "pos_neg" or
// "anchor_neg", DESIGN §3) of anchors against references (`ref_emb`): the walk of
// metrix_refs_walk.h with the in-batch op's kernels (contrastive_metrix_kernels.h), as
// per-anchor sums and counts of the mixed candidates' hinge terms per side, and with `clean`
// the clean terms on the anchors' rows of S the walk computes anyway, so the clean loss
// against references costs no product of its own (one in the forward and two in the
// backward fewer than beside the clean op; the products are most of this op's time). The
// AvgNonZero of each side is the Python glue's (fused/contrastive.py).
#include <torch/library.h>

#include "cpu/contrastive_blocks.h"
#include "cpu/contrastive_metrix_kernels.h"
#include "cpu/metrix_refs_walk.h"

namespace metrix_ops {

namespace {

using EightTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor>;

// The clean terms of anchors [a0, a1) (one class, one thread) in a walk tile: their rows of
// S = X R_cᵀ over the tile's columns c0.., each anchor's own slot own[a] no pair; the clean
// op's per-term rule (contrastive_blocks.h).
template <typename T>
void clean_fold(const MixGeom<T>& geo, int64_t a0, int64_t a1, const ConParams<T>& p,
                const int64_t* own, ConAcc* acc) {
  for (int64_t a = a0; a < a1; ++a) {
    const T* row = geo.s + (a - geo.r0) * geo.nc;
    const int32_t la = geo.row_lab[a];
    const int32_t* col = geo.col_lab + geo.c0;
    const int64_t skip = own[a] - geo.c0;  // < 0 or ≥ nc: not in this tile
    ConAcc c;
    for (int64_t j = 0; j < geo.nc; ++j)
      if (j != skip) con_push(c, p, row[j], col[j] == la);
    acc[a].add(c);
  }
}

// Their entries of ∂L/∂S (upstream gp, gn: per anchor, ∂L/∂ its clean pos / neg sum) added
// into the tile's gradient rows, beside the mixed candidates' own.
template <typename T>
void clean_grad(const MixGeom<T>& geo, int64_t a0, int64_t a1, const ConParams<T>& p,
                const int64_t* own, const T* gp, const T* gn) {
  for (int64_t a = a0; a < a1; ++a) {
    const T* row = geo.s + (a - geo.r0) * geo.nc;
    T* g = geo.gm + (a - geo.r0) * geo.nc;
    const int32_t la = geo.row_lab[a];
    const int32_t* col = geo.col_lab + geo.c0;
    const int64_t skip = own[a] - geo.c0;
    for (int64_t j = 0; j < geo.nc; ++j) {
      if (j == skip) continue;
      const bool pos = col[j] == la;
      const PairTerm<T> t = p.term(row[j], pos);
      if (in_window(t.value, p.low, p.high))
        g[j] += (pos ? gp[a] : gn[a]) * contrastive_slope(t, p.cosine, pos);
    }
  }
}

}  // namespace

EightTensors contrastive_metrix_refs_fwd_cpu(const at::Tensor& x, const at::Tensor& r,
                                             const at::Tensor& labels,
                                             const at::Tensor& ref_labels,
                                             const at::Tensor& self, bool cosine,
                                             double pos_margin, double neg_margin, double lam,
                                             bool anchor_neg, bool clean, double low,
                                             double high, int64_t group) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  std::vector<ConAcc> plain(c.x.size(0)), mixed(c.x.size(0));
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "contrastive_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    const ConMix<T> cm{cosine, T(pos_margin), T(neg_margin)};
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const int64_t* own = c.own.data_ptr<int64_t>();
    const auto& k = con_mix_kernels<T>();
    c.fold<T>(lam, anchor_neg, [&](const MixGeom<T>& geo) {
      return [&, b = cm.side(geo), geo](int64_t a0, int64_t a1) {
        k.fold(b, a0, a1, mixed.data());
        if (clean) clean_fold<T>(geo, a0, a1, p, own, plain.data());
      };
    });
  });
  auto cl = con_outputs(plain, c.x.options());
  auto m = con_outputs(mixed, c.x.options());
  return {std::get<0>(cl), std::get<1>(cl), std::get<2>(cl), std::get<3>(cl),
          std::get<0>(m),  std::get<1>(m),  std::get<2>(m),  std::get<3>(m)};
}

std::tuple<at::Tensor, at::Tensor> contrastive_metrix_refs_bwd_cpu(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& grad_mix_pos,
    const at::Tensor& grad_mix_neg, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& self, bool cosine,
    double pos_margin, double neg_margin, double lam, bool anchor_neg, bool clean, double low,
    double high, int64_t group, bool need_dr) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  const auto v = row_vectors(c.x, {{&grad_pos, "grad_pos"}, {&grad_neg, "grad_neg"},
                                   {&grad_mix_pos, "grad_mix_pos"},
                                   {&grad_mix_neg, "grad_mix_neg"}});
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "contrastive_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    ConMix<T> cm{cosine, T(pos_margin), T(neg_margin)};
    cm.g_pos = v[2].data_ptr<T>();
    cm.g_neg = v[3].data_ptr<T>();
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const T *gp = v[0].data_ptr<T>(), *gn = v[1].data_ptr<T>();
    const int64_t* own = c.own.data_ptr<int64_t>();
    const auto& k = con_mix_kernels<T>();
    out = c.grad<T>(lam, anchor_neg, need_dr, [&](const MixGeom<T>& geo) {
      return [&, b = cm.side(geo), geo](int64_t a0, int64_t a1) {
        k.grad(b, a0, a1);
        if (clean) clean_grad<T>(geo, a0, a1, p, own, gp, gn);
      };
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Per anchor, the clean (pos_sum, pos_cnt, neg_sum, neg_cnt) of contrastive_fwd (terms
  // kept when low < term < high; zeros unless clean), then the mixed four of
  // contrastive_metrix_self_fwd — its candidates' terms λ·[·]₊ and (1−λ)·[·]₊, kept when
  // > 0 — for label-sorted unit anchors x against label-sorted unit references r (self[a]:
  // a's own row of r, −1: none, which is neither a pair nor its positive); classes in groups
  // of about `group` entries.
  m.def("contrastive_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, bool clean, float low, float high, int group) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_metrix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor grad_mix_pos, "
        "Tensor grad_mix_neg, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, bool clean, float low, float high, int group, bool need_dr) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("contrastive_metrix_refs_fwd", &contrastive_metrix_refs_fwd_cpu);
  m.impl("contrastive_metrix_refs_bwd", &contrastive_metrix_refs_bwd_cpu);
}

}  // namespace metrix_ops
