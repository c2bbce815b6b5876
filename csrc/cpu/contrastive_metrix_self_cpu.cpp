// Contrastive loss of a batch against itself together with its embedding-level Metrix term
// (pairs "pos_neg" or "anchor_neg", DESIGN §3), in one pass over the symmetric S = X Xᵀ
// (the block walk of metrix_blocks.h, blocks cut between classes of the label-sorted batch).
// The clean terms are the clean op's (contrastive_blocks.h); the mixed candidates' hinge
// terms (contrastive_metrix_kernels.h) are folded into per-anchor sums and counts of the
// nonzero terms per side: the mixed term AvgNonZero-reduces each side over all candidates,
// so the Python side divides the totals, and the backward's per-anchor row gradients are
// those totals' 1/count.
#include <torch/library.h>

#include "cpu/contrastive_metrix_kernels.h"
#include "cpu/metrix_blocks.h"
#include "cpu/ms_blocks.h"

namespace metrix_ops {

namespace {

void check_con_metrix(const at::Tensor& x, const at::Tensor& labels, double lam, int64_t block) {
  check_self_inputs(x, labels, block);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
}

}  // namespace

using EightTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor>;

EightTensors contrastive_metrix_self_fwd_cpu(const at::Tensor& x_, const at::Tensor& labels_,
                                             bool cosine, double pos_margin, double neg_margin,
                                             double low, double high, double lam,
                                             bool anchor_neg, int64_t block) {
  check_con_metrix(x_, labels_, lam, block);
  auto x = x_.contiguous();
  auto labels = labels_.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  const ClassLayout cls = class_layout(labels, block);
  const int64_t B = x.size(0);
  std::vector<ConAcc> clean(B), mixed(B);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_metrix_self_fwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const int64_t* y = labels.data_ptr<int64_t>();
    const std::vector<T> wc = within_class_cosines<T>(x, cls);
    const MixLayout<T> ml{cls, ids.data_ptr<int32_t>(), wc.data(), T(lam), anchor_neg};
    const ConMix<T> cm{cosine, T(pos_margin), T(neg_margin)};
    const auto& k = con_mix_kernels<T>();
    metrix_fold_blocks<T>(
        x, ml,
        [&](const MixGeom<T>& geo) {
          return [&k, b = cm.side(geo), &mixed](int64_t a0, int64_t a1) {
            k.fold(b, a0, a1, mixed.data());
          };
        },
        [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          if (c0 == r0)  // holds both (i, j) and (j, i): rows only, self pairs out
            con_fold_rows<T>(s.data_ptr<T>(), nr, nc, r0, c0, ConLabels{y, y, true}, p,
                             clean.data());
          else
            con_fold_sym<T>(s.data_ptr<T>(), nr, nc, r0, c0, y, p, clean.data());
        });
  });
  auto c = con_outputs(clean, x.options());
  auto m = con_outputs(mixed, x.options());
  return {std::get<0>(c), std::get<1>(c), std::get<2>(c), std::get<3>(c),
          std::get<0>(m), std::get<1>(m), std::get<2>(m), std::get<3>(m)};
}

at::Tensor contrastive_metrix_self_bwd_cpu(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                           const at::Tensor& grad_mix_pos,
                                           const at::Tensor& grad_mix_neg, const at::Tensor& x_,
                                           const at::Tensor& labels_, bool cosine,
                                           double pos_margin, double neg_margin, double low,
                                           double high, double lam, bool anchor_neg,
                                           int64_t block) {
  check_con_metrix(x_, labels_, lam, block);
  auto x = x_.contiguous();
  auto labels = labels_.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  const ClassLayout cls = class_layout(labels, block);
  const auto v = row_vectors(x, {{&grad_pos, "grad_pos"}, {&grad_neg, "grad_neg"},
                                 {&grad_mix_pos, "grad_mix_pos"}, {&grad_mix_neg, "grad_mix_neg"}});
  const at::Tensor &gp = v[0], &gn = v[1], &gmp = v[2], &gmn = v[3];
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "contrastive_metrix_self_bwd_cpu", [&] {
    using T = scalar_t;
    const ConParams<T> p{cosine, T(pos_margin), T(neg_margin), T(low), T(high)};
    const int64_t* y = labels.data_ptr<int64_t>();
    const ConLabels lab{y, y, true};
    const std::vector<T> wc = within_class_cosines<T>(x, cls);
    std::vector<T> gw(wc.size(), T(0));
    MixLayout<T> ml{cls, ids.data_ptr<int32_t>(), wc.data(), T(lam), anchor_neg};
    ml.gw = gw.data();
    ConMix<T> cm{cosine, T(pos_margin), T(neg_margin)};
    cm.g_pos = gmp.data_ptr<T>();
    cm.g_neg = gmn.data_ptr<T>();
    const auto& k = con_mix_kernels<T>();
    const T *gpp = gp.data_ptr<T>(), *gnp = gn.data_ptr<T>();
    dx = metrix_grad_blocks<T>(
        x, ml,
        [&](const MixGeom<T>& geo) {
          return [&k, b = cm.side(geo)](int64_t a0, int64_t a1) { k.grad(b, a0, a1); };
        },
        [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          // H = G_IJ + G_JIᵀ: entry (i, j) is (g_i + g_j)·t'(s_ij), diagonal blocks too
          con_grad_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, p, gpp, gnp, gpp, gnp);
        });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Contrastive loss of a label-sorted batch against itself (self pairs excluded) plus its
  // embedding-level Metrix term at mixing weight lam, pairs pos_neg (or anchor_neg). Per
  // anchor: the clean (pos_sum, pos_cnt, neg_sum, neg_cnt) of contrastive_self_fwd (terms
  // kept when low < term < high), then the same four of its mixed candidates' terms
  // λ·[·]₊ and (1−λ)·[·]₊ (kept when > 0: AvgNonZero).
  m.def("contrastive_metrix_self_fwd(Tensor x, Tensor labels, bool cosine, float pos_margin, "
        "float neg_margin, float low, float high, float lam, bool anchor_neg, int block) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_metrix_self_bwd(Tensor grad_pos, Tensor grad_neg, Tensor grad_mix_pos, "
        "Tensor grad_mix_neg, Tensor x, Tensor labels, bool cosine, float pos_margin, "
        "float neg_margin, float low, float high, float lam, bool anchor_neg, int block) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("contrastive_metrix_self_fwd", &contrastive_metrix_self_fwd_cpu);
  m.impl("contrastive_metrix_self_bwd", &contrastive_metrix_self_bwd_cpu);
}

}  // namespace metrix_ops
