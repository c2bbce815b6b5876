// The embedding-level Metrix terms of CircleLoss and GeneralizedLiftedStructureLoss (pairs
// "pos_neg" or "anchor_neg", DESIGN §3) of anchors against references (`ref_emb`): the walk
// of metrix_refs_walk.h with the in-batch ops' kernels (lse_mix_kernels.h), as their two
// per-anchor log-sum-exps over the mixed candidates; the clean losses are the clean ops',
// and the λ weights and the losses' own finish are the in-batch ops' Python glue
// (metrix_ops/ops/circle_metrix.py, lifted_metrix.py).
#include <torch/library.h>

#include "cpu/lse_mix_self.h"
#include "cpu/metrix_refs_walk.h"

namespace metrix_ops {

namespace {

template <typename T, class P>
std::tuple<at::Tensor, at::Tensor> lse_mix_refs_fwd(RefsCall& c, const P& p, double lam,
                                                    bool anchor_neg,
                                                    void (*fold)(const LseMixBlock<T, P>&,
                                                                 int64_t, int64_t,
                                                                 OnlineLse<T>*, OnlineLse<T>*)) {
  const int64_t B = c.x.size(0);
  std::vector<OnlineLse<T>> pos(B, OnlineLse<T>::empty()), neg(B, OnlineLse<T>::empty());
  c.fold<T>(lam, anchor_neg, [&](const MixGeom<T>& geo) {
    return [fold, b = LseMixBlock<T, P>{geo, p, nullptr, nullptr, nullptr, nullptr}, &pos,
            &neg](int64_t a0, int64_t a1) { fold(b, a0, a1, pos.data(), neg.data()); };
  });
  return lse_values<T>(pos, neg, c.x.options());
}

template <typename T, class P>
std::tuple<at::Tensor, at::Tensor> lse_mix_refs_bwd(
    RefsCall& c, const P& p, double lam, bool anchor_neg, bool need_dr,
    void (*grad)(const LseMixBlock<T, P>&, int64_t, int64_t), const std::vector<at::Tensor>& v) {
  const LseMixBlock<T, P> proto{MixGeom<T>{}, p, v[0].data_ptr<T>(), v[1].data_ptr<T>(),
                                v[2].data_ptr<T>(), v[3].data_ptr<T>()};
  return c.grad<T>(lam, anchor_neg, need_dr, [&](const MixGeom<T>& geo) {
    LseMixBlock<T, P> b = proto;
    static_cast<MixGeom<T>&>(b) = geo;
    return [grad, b](int64_t a0, int64_t a1) { grad(b, a0, a1); };
  });
}

}  // namespace

using TwoTensors = std::tuple<at::Tensor, at::Tensor>;

TwoTensors circle_metrix_refs_fwd_cpu(const at::Tensor& x, const at::Tensor& r,
                                      const at::Tensor& labels, const at::Tensor& ref_labels,
                                      const at::Tensor& self, double m, double gamma, double lam,
                                      bool anchor_neg, int64_t group) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  TwoTensors out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "circle_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    out = lse_mix_refs_fwd<T, CircleConsts<T>>(c, circle_consts<T>(m, gamma), lam, anchor_neg,
                                                lse_mix_kernels<T>().circle_fold);
  });
  return out;
}

TwoTensors circle_metrix_refs_bwd_cpu(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                      const at::Tensor& x, const at::Tensor& r,
                                      const at::Tensor& labels, const at::Tensor& ref_labels,
                                      const at::Tensor& self, const at::Tensor& lse_pos,
                                      const at::Tensor& lse_neg, double m, double gamma,
                                      double lam, bool anchor_neg, int64_t group, bool need_dr) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  const auto v = row_vectors(c.x, {{&grad_pos, "grad_pos"}, {&grad_neg, "grad_neg"},
                                           {&lse_pos, "lse_pos"}, {&lse_neg, "lse_neg"}});
  TwoTensors out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "circle_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    out = lse_mix_refs_bwd<T, CircleConsts<T>>(c, circle_consts<T>(m, gamma), lam, anchor_neg,
                                                need_dr, lse_mix_kernels<T>().circle_grad, v);
  });
  return out;
}

TwoTensors lifted_metrix_refs_fwd_cpu(const at::Tensor& x, const at::Tensor& r,
                                      const at::Tensor& labels, const at::Tensor& ref_labels,
                                      const at::Tensor& self, bool cosine, double pos_margin,
                                      double neg_margin, double lam, bool anchor_neg,
                                      int64_t group) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  TwoTensors out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lifted_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    const LiftedMixParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    out = lse_mix_refs_fwd<T, LiftedMixParams<T>>(c, p, lam, anchor_neg,
                                                   lse_mix_kernels<T>().lifted_fold);
  });
  return out;
}

TwoTensors lifted_metrix_refs_bwd_cpu(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                      const at::Tensor& x, const at::Tensor& r,
                                      const at::Tensor& labels, const at::Tensor& ref_labels,
                                      const at::Tensor& self, const at::Tensor& lse_pos,
                                      const at::Tensor& lse_neg, bool cosine, double pos_margin,
                                      double neg_margin, double lam, bool anchor_neg,
                                      int64_t group, bool need_dr) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  const auto v = row_vectors(c.x, {{&grad_pos, "grad_pos"}, {&grad_neg, "grad_neg"},
                                           {&lse_pos, "lse_pos"}, {&lse_neg, "lse_neg"}});
  TwoTensors out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lifted_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    const LiftedMixParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    out = lse_mix_refs_bwd<T, LiftedMixParams<T>>(c, p, lam, anchor_neg, need_dr,
                                                   lse_mix_kernels<T>().lifted_grad, v);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // As circle_metrix_self_fwd / lifted_metrix_self_fwd, for label-sorted unit anchors x
  // against label-sorted unit references r (self[a]: a's own row of r, −1: none, which is
  // not its positive); classes in groups of about `group` entries (ms_metrix_refs_fwd).
  m.def("circle_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, float m, float gamma, float lam, bool anchor_neg, int group) "
        "-> (Tensor, Tensor)");
  m.def("circle_metrix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, "
        "Tensor labels, Tensor ref_labels, Tensor self, Tensor lse_pos, Tensor lse_neg, "
        "float m, float gamma, float lam, bool anchor_neg, int group, bool need_dr) "
        "-> (Tensor, Tensor)");
  m.def("lifted_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, int group) -> (Tensor, Tensor)");
  m.def("lifted_metrix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, "
        "Tensor labels, Tensor ref_labels, Tensor self, Tensor lse_pos, Tensor lse_neg, "
        "bool cosine, float pos_margin, float neg_margin, float lam, bool anchor_neg, "
        "int group, bool need_dr) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("circle_metrix_refs_fwd", &circle_metrix_refs_fwd_cpu);
  m.impl("circle_metrix_refs_bwd", &circle_metrix_refs_bwd_cpu);
  m.impl("lifted_metrix_refs_fwd", &lifted_metrix_refs_fwd_cpu);
  m.impl("lifted_metrix_refs_bwd", &lifted_metrix_refs_bwd_cpu);
}

}  // namespace metrix_ops
