// The embedding-level Metrix term of the contrastive loss (pairs "pos_neg" or "anchor_neg",
// DESIGN §3) of anchors against references (`ref_emb`): the walk of metrix_refs_walk.h with
// the in-batch op's kernels (contrastive_metrix_kernels.h), as per-anchor sums and counts of
// the mixed candidates' hinge terms per side; the clean loss is the clean op's against
// references, and the AvgNonZero of each side is the Python glue's (fused/contrastive.py).
#include <torch/library.h>

#include "cpu/contrastive_blocks.h"
#include "cpu/contrastive_metrix_kernels.h"
#include "cpu/metrix_refs_walk.h"

namespace metrix_ops {

using FourTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FourTensors contrastive_metrix_refs_fwd_cpu(const at::Tensor& x, const at::Tensor& r,
                                            const at::Tensor& labels,
                                            const at::Tensor& ref_labels,
                                            const at::Tensor& self, bool cosine,
                                            double pos_margin, double neg_margin, double lam,
                                            bool anchor_neg, int64_t group) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  std::vector<ConAcc> mixed(c.x.size(0));
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "contrastive_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    const ConMix<T> cm{cosine, T(pos_margin), T(neg_margin)};
    const auto& k = con_mix_kernels<T>();
    c.fold<T>(lam, anchor_neg, [&](const MixGeom<T>& geo) {
      return [&k, b = cm.side(geo), &mixed](int64_t a0, int64_t a1) {
        k.fold(b, a0, a1, mixed.data());
      };
    });
  });
  return con_outputs(mixed, c.x.options());
}

std::tuple<at::Tensor, at::Tensor> contrastive_metrix_refs_bwd_cpu(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& r, const at::Tensor& labels, const at::Tensor& ref_labels,
    const at::Tensor& self, bool cosine, double pos_margin, double neg_margin, double lam,
    bool anchor_neg, int64_t group, bool need_dr) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  const auto v = row_vectors(c.x, {{&grad_pos, "grad_pos"}, {&grad_neg, "grad_neg"}});
  const at::Tensor &gp = v[0], &gn = v[1];
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "contrastive_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    ConMix<T> cm{cosine, T(pos_margin), T(neg_margin)};
    cm.g_pos = gp.data_ptr<T>();
    cm.g_neg = gn.data_ptr<T>();
    const auto& k = con_mix_kernels<T>();
    out = c.grad<T>(lam, anchor_neg, need_dr, [&](const MixGeom<T>& geo) {
      return [&k, b = cm.side(geo)](int64_t a0, int64_t a1) { k.grad(b, a0, a1); };
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // The mixed four of contrastive_metrix_self_fwd — per anchor (pos_sum, pos_cnt, neg_sum,
  // neg_cnt) of its candidates' terms λ·[·]₊ and (1−λ)·[·]₊ (kept when > 0) — for
  // label-sorted unit anchors x against label-sorted unit references r (self[a]: a's own row
  // of r, −1: none, which is not its positive); classes in groups of about `group` entries.
  m.def("contrastive_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, int group) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_metrix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, "
        "Tensor labels, Tensor ref_labels, Tensor self, bool cosine, float pos_margin, "
        "float neg_margin, float lam, bool anchor_neg, int group, bool need_dr) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("contrastive_metrix_refs_fwd", &contrastive_metrix_refs_fwd_cpu);
  m.impl("contrastive_metrix_refs_bwd", &contrastive_metrix_refs_bwd_cpu);
}

}  // namespace metrix_ops
