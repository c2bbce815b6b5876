// The embedding-level Metrix term of the multi-similarity loss (pairs "pos_neg" or
// "anchor_neg", DESIGN §3) of anchors against references (`ref_emb`, a memory bank): the
// walk of metrix_refs_walk.h with the in-batch op's kernels (ms_metrix_kernels.h). The clean
// loss is the clean op's (ms_loss_fwd); this op carries the mixed term only.
#include <torch/library.h>

#include "cpu/metrix_refs_walk.h"
#include "cpu/ms_blocks.h"
#include "cpu/ms_metrix_rows.h"

namespace metrix_ops {

namespace {

void check_refs_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                       const at::Tensor& ref_labels, const at::Tensor& self, double lam) {
  check_pair_inputs(x, r, labels, ref_labels, 1);
  check_labels_of(self, x.size(0), "self");
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
}

}  // namespace

// (mixed rows ℓ̃(a), their two log normalisers) per anchor of the label-sorted unit rows x
// against the label-sorted unit references r
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_metrix_refs_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, const at::Tensor& self_, double alpha, double beta,
    double base, double lam, bool anchor_neg, int64_t group) {
  check_refs_inputs(x_, r_, labels_, ref_labels_, self_, lam);
  const at::Tensor x = x_.contiguous(), r = r_.contiguous(), labels = labels_.contiguous(),
                   ref_labels = ref_labels_.contiguous();
  RefsLayout L = refs_layout(labels, ref_labels, self_.contiguous(), group);
  const auto ids = ms_label_ids(labels, ref_labels);
  const int64_t B = x.size(0);
  at::Tensor rows = at::zeros({B}, x.options()), tp = at::zeros({B}, x.options()),
             tn = at::zeros({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> mpos(B, OnlineLse<T>::empty()), mneg(B, OnlineLse<T>::empty());
    const MsMix<T> mm{T(alpha), T(beta), T(base)};
    const auto& k = ms_kernels<T>();
    metrix_refs_walk<T>(
        x, r, L, ids.first.data_ptr<int32_t>(), ids.second.data_ptr<int32_t>(), T(lam),
        anchor_neg, /*with_grad=*/false,
        [&](const MixGeom<T>& geo) {
          return [&k, b = mm.side(geo), &mpos, &mneg](int64_t a0, int64_t a1) {
            k.mix_fold(b, a0, a1, mpos.data(), mneg.data());
          };
        },
        [](const RefsGroup&, const at::Tensor&, const at::Tensor&) {});
    finish_mixed<T>(mpos, mneg, T(lam), T(alpha), T(beta), rows, tp, tn);
  });
  return {rows, tp, tn};
}

std::tuple<at::Tensor, at::Tensor> ms_metrix_refs_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& self_,
    const at::Tensor& tp_, const at::Tensor& tn_, double alpha, double beta, double base,
    double lam, bool anchor_neg, int64_t group, bool need_dr) {
  check_refs_inputs(x_, r_, labels_, ref_labels_, self_, lam);
  const int64_t B = x_.size(0);
  check_vec(grad_rows, B, "grad_rows");
  check_vec(tp_, B, "tp");
  check_vec(tn_, B, "tn");
  const at::Tensor x = x_.contiguous(), r = r_.contiguous(), labels = labels_.contiguous(),
                   ref_labels = ref_labels_.contiguous();
  auto as_x = [&](const at::Tensor& t) { return t.to(x.scalar_type()).contiguous(); };
  const at::Tensor g = as_x(grad_rows), tp = as_x(tp_), tn = as_x(tn_);
  RefsLayout L = refs_layout(labels, ref_labels, self_.contiguous(), group);
  const auto ids = ms_label_ids(labels, ref_labels);
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    MsMix<T> mm{T(alpha), T(beta), T(base)};
    mm.g = g.data_ptr<T>();
    mm.tp = tp.data_ptr<T>();
    mm.tn = tn.data_ptr<T>();
    const auto& k = ms_kernels<T>();
    out = metrix_refs_grad<T>(x, r, L, ids.first.data_ptr<int32_t>(),
                              ids.second.data_ptr<int32_t>(), T(lam), anchor_neg, need_dr,
                              [&](const MixGeom<T>& geo) {
                                return [&k, b = mm.side(geo)](int64_t a0, int64_t a1) {
                                  k.mix_grad(b, a0, a1);
                                };
                              });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // The Metrix term of MS (pos_neg, or anchor_neg) for label-sorted unit anchors x against
  // label-sorted unit references r; self[a] is anchor a's own row of r (−1: none), which is
  // not its positive: (ℓ̃(a), 0 without a candidate; its two log normalisers). The classes
  // go in groups whose tiles hold about `group` entries each (one class at least).
  m.def("ms_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, Tensor self, "
        "float alpha, float beta, float base, float lam, bool anchor_neg, int group) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ms_metrix_refs_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, "
        "Tensor ref_labels, Tensor self, Tensor tp, Tensor tn, float alpha, float beta, "
        "float base, float lam, bool anchor_neg, int group, bool need_dr) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_metrix_refs_fwd", &ms_metrix_refs_fwd_cpu);
  m.impl("ms_metrix_refs_bwd", &ms_metrix_refs_bwd_cpu);
}

}  // namespace metrix_ops
