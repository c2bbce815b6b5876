// Multi-similarity loss of a batch against itself together with its embedding-level Metrix
// term (pairs "pos_neg" or "anchor_neg", DESIGN §3), in one pass over the symmetric S = X Xᵀ
// (the block walk of metrix_blocks.h; the per-candidate MS terms in ms_metrix_kernels.h).
#include <torch/library.h>

#include "cpu/ms_blocks.h"
#include "cpu/metrix_blocks.h"
#include "cpu/ms_metrix_kernels.h"
#include "cpu/ms_metrix_rows.h"

namespace metrix_ops {

SixTensors ms_metrix_self_fwd_cpu(const at::Tensor& x_, const at::Tensor& labels_,
                                               double alpha, double beta, double base,
                                               double lam, bool anchor_neg, int64_t block) {
  check_self_inputs(x_, labels_, block);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels_);
  const ClassLayout cls = class_layout(labels_, block);
  const int64_t B = x.size(0);
  auto vec = [&] { return at::zeros({B}, x.options()); };
  at::Tensor rows = vec(), lse_pos = vec(), lse_neg = vec(), mix = vec(), tp = vec(), tn = vec();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_self_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    std::vector<OnlineLse<T>> mpos(B, OnlineLse<T>::empty()), mneg(B, OnlineLse<T>::empty());
    const std::vector<T> wc = within_class_cosines<T>(x, cls);
    const int32_t* lab_ids = ids.data_ptr<int32_t>();
    const BlockLabels lab{lab_ids, lab_ids, true};
    const MixLayout<T> ml{cls, lab_ids, wc.data(), T(lam), anchor_neg};
    const MsMix<T> mm{T(alpha), T(beta), T(base)};
    const auto& k = ms_kernels<T>();
    metrix_fold_blocks<T>(
        x, ml,
        [&](const MixGeom<T>& geo) {
          return [&k, b = mm.side(geo), &mpos, &mneg](int64_t a0, int64_t a1) {
            k.mix_fold(b, a0, a1, mpos.data(), mneg.data());
          };
        },
        [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          ms_fold_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, T(alpha), T(beta), T(base),
                           pos.data(), neg.data(), /*cols=*/c0 != r0);
        });
    ms_finish_rows<T>(pos, neg, T(alpha), T(beta), rows, lse_pos, lse_neg);
    finish_mixed<T>(mpos, mneg, T(lam), T(alpha), T(beta), mix, tp, tn);
  });
  return {rows, lse_pos, lse_neg, mix, tp, tn};
}

at::Tensor ms_metrix_self_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& grad_mix,
                                  const at::Tensor& x_, const at::Tensor& labels_,
                                  const at::Tensor& lse_pos_, const at::Tensor& lse_neg_,
                                  const at::Tensor& tp_, const at::Tensor& tn_, double alpha,
                                  double beta, double base, double lam, bool anchor_neg,
                                  int64_t block) {
  check_self_inputs(x_, labels_, block);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels_);
  const ClassLayout cls = class_layout(labels_, block);
  const auto v = row_vectors(x, {{&grad_rows, "grad_rows"}, {&grad_mix, "grad_mix"},
                                 {&lse_pos_, "lse_pos"}, {&lse_neg_, "lse_neg"}, {&tp_, "tp"},
                                 {&tn_, "tn"}});
  const at::Tensor &g = v[0], &gmix = v[1], &lse_pos = v[2], &lse_neg = v[3], &tp = v[4],
                   &tn = v[5];
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_self_bwd_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> wc = within_class_cosines<T>(x, cls);
    std::vector<T> gw(wc.size(), T(0));
    const int32_t* lab_ids = ids.data_ptr<int32_t>();
    const BlockLabels lab{lab_ids, lab_ids, true};
    MixLayout<T> ml{cls, lab_ids, wc.data(), T(lam), anchor_neg};
    ml.gw = gw.data();
    MsMix<T> mm{T(alpha), T(beta), T(base)};
    mm.g = gmix.data_ptr<T>();
    mm.tp = tp.data_ptr<T>();
    mm.tn = tn.data_ptr<T>();
    const auto& k = ms_kernels<T>();
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    dx = metrix_grad_blocks<T>(
        x, ml,
        [&](const MixGeom<T>& geo) {
          return [&k, b = mm.side(geo)](int64_t a0, int64_t a1) { k.mix_grad(b, a0, a1); };
        },
        [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          ms_grad_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, gp, lp, ln, T(alpha), T(beta),
                           T(base), /*sym=*/true);
        });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // MS of a label-sorted batch against itself plus its Metrix (pos_neg, embedding level)
  // term at mixing weight lam, pairs pos_neg (or anchor_neg): (rows, lse_pos, lse_neg, mixed rows, their two log
  // normalisers). The mixed rows are ℓ̃(a), 0 for an anchor with no candidate.
  m.def("ms_metrix_self_fwd(Tensor x, Tensor labels, float alpha, float beta, float base, "
        "float lam, bool anchor_neg, int block) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ms_metrix_self_bwd(Tensor grad_rows, Tensor grad_mix, Tensor x, Tensor labels, "
        "Tensor lse_pos, Tensor lse_neg, Tensor tp, Tensor tn, float alpha, float beta, "
        "float base, float lam, bool anchor_neg, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_metrix_self_fwd", &ms_metrix_self_fwd_cpu);
  m.impl("ms_metrix_self_bwd", &ms_metrix_self_bwd_cpu);
}

}  // namespace metrix_ops
