// The embedding-level Metrix terms of CircleLoss and GeneralizedLiftedStructureLoss (pairs
// "pos_neg" or "anchor_neg", DESIGN §3) of anchors against references (`ref_emb`): the walk
// of metrix_refs_walk.h with the in-batch ops' kernels (lse_mix_kernels.h), as their two
// per-anchor log-sum-exps over the mixed candidates, and the λ weights and the losses' own
// finish are the in-batch ops' Python glue (metrix_ops/ops/circle_metrix.py, lifted_metrix.py).
// With `clean` the ops also fold the clean loss's two log-sum-exps from the anchors' rows of
// S that the walk computes for the candidates (LseMixKernel::clean_fold), so that the clean
// loss against references costs no product of its own (one fewer in the forward, two in the
// backward: the products are most of this op's time at D = 512).
#include <torch/library.h>

#include "cpu/lse_mix_self.h"
#include "cpu/metrix_refs_walk.h"

namespace metrix_ops {

namespace {

// The walk's forward: (lse⁺, lse⁻) of the mixed candidates, then with `clean` those of the
// anchors' clean pairs (the rows of S the walk computes for the candidates anyway; −inf
// unless clean).
template <typename T, class P>
std::vector<at::Tensor> lse_mix_refs_fwd(RefsCall& c, const P& p, double lam, bool anchor_neg,
                                         bool clean,
                                         void (*fold)(const LseMixBlock<T, P>&, int64_t,
                                                      int64_t, OnlineLse<T>*, OnlineLse<T>*)) {
  const int64_t B = c.x.size(0);
  std::vector<OnlineLse<T>> pos(B, OnlineLse<T>::empty()), neg(B, OnlineLse<T>::empty());
  std::vector<OnlineLse<T>> cpos(B, OnlineLse<T>::empty()), cneg(B, OnlineLse<T>::empty());
  LseMixBlock<T, P> proto{MixGeom<T>{}, p, nullptr, nullptr, nullptr, nullptr};
  if (clean) proto.clean = LseClean<T>{c.own.data_ptr<int64_t>(), cpos.data(), cneg.data()};
  c.fold<T>(lam, anchor_neg, [&](const MixGeom<T>& geo) {
    LseMixBlock<T, P> b = proto;
    static_cast<MixGeom<T>&>(b) = geo;
    return [fold, b, &pos, &neg](int64_t a0, int64_t a1) {
      fold(b, a0, a1, pos.data(), neg.data());
    };
  });
  auto [lp, ln] = lse_values<T>(pos, neg, c.x.options());
  auto [clp, cln] = lse_values<T>(cpos, cneg, c.x.options());
  return {lp, ln, clp, cln};
}

// v: ∂L/∂(mixed lse⁺, lse⁻), the mixed lse⁺, lse⁻, and with `clean` the same four of the
// clean pairs'
template <typename T, class P>
std::tuple<at::Tensor, at::Tensor> lse_mix_refs_bwd(
    RefsCall& c, const P& p, double lam, bool anchor_neg, bool need_dr, bool clean,
    void (*grad)(const LseMixBlock<T, P>&, int64_t, int64_t), const std::vector<at::Tensor>& v) {
  LseMixBlock<T, P> proto{MixGeom<T>{}, p, v[0].data_ptr<T>(), v[1].data_ptr<T>(),
                          v[2].data_ptr<T>(), v[3].data_ptr<T>()};
  if (clean)
    proto.clean = LseClean<T>{c.own.data_ptr<int64_t>(), nullptr, nullptr, v[4].data_ptr<T>(),
                              v[5].data_ptr<T>(), v[6].data_ptr<T>(), v[7].data_ptr<T>()};
  return c.grad<T>(lam, anchor_neg, need_dr, [&](const MixGeom<T>& geo) {
    LseMixBlock<T, P> b = proto;
    static_cast<MixGeom<T>&>(b) = geo;
    return [grad, b](int64_t a0, int64_t a1) { grad(b, a0, a1); };
  });
}

}  // namespace

using TwoTensors = std::tuple<at::Tensor, at::Tensor>;

using FourTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FourTensors circle_metrix_refs_fwd_cpu(const at::Tensor& x, const at::Tensor& r,
                                       const at::Tensor& labels, const at::Tensor& ref_labels,
                                       const at::Tensor& self, double m, double gamma,
                                       double lam, bool anchor_neg, bool clean, int64_t group) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "circle_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    out = lse_mix_refs_fwd<T, CircleConsts<T>>(c, circle_consts<T>(m, gamma), lam, anchor_neg,
                                                clean, lse_mix_kernels<T>().circle_fold);
  });
  return {out[0], out[1], out[2], out[3]};
}

TwoTensors circle_metrix_refs_bwd_cpu(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                      const at::Tensor& grad_clean_pos,
                                      const at::Tensor& grad_clean_neg, const at::Tensor& x,
                                      const at::Tensor& r, const at::Tensor& labels,
                                      const at::Tensor& ref_labels, const at::Tensor& self,
                                      const at::Tensor& lse_pos, const at::Tensor& lse_neg,
                                      const at::Tensor& clean_pos, const at::Tensor& clean_neg,
                                      double m, double gamma, double lam, bool anchor_neg,
                                      bool clean, int64_t group, bool need_dr) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  const auto v = lse_bwd_vectors(c.x, {grad_pos, grad_neg, lse_pos, lse_neg, grad_clean_pos,
                                 grad_clean_neg, clean_pos, clean_neg});
  TwoTensors out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "circle_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    out = lse_mix_refs_bwd<T, CircleConsts<T>>(c, circle_consts<T>(m, gamma), lam, anchor_neg,
                                                need_dr, clean,
                                                lse_mix_kernels<T>().circle_grad, v);
  });
  return out;
}

FourTensors lifted_metrix_refs_fwd_cpu(const at::Tensor& x, const at::Tensor& r,
                                       const at::Tensor& labels, const at::Tensor& ref_labels,
                                       const at::Tensor& self, bool cosine, double pos_margin,
                                       double neg_margin, double lam, bool anchor_neg,
                                       bool clean, int64_t group) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lifted_metrix_refs_fwd_cpu", [&] {
    using T = scalar_t;
    const LiftedMixParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    out = lse_mix_refs_fwd<T, LiftedMixParams<T>>(c, p, lam, anchor_neg, clean,
                                                   lse_mix_kernels<T>().lifted_fold);
  });
  return {out[0], out[1], out[2], out[3]};
}

TwoTensors lifted_metrix_refs_bwd_cpu(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                      const at::Tensor& grad_clean_pos,
                                      const at::Tensor& grad_clean_neg, const at::Tensor& x,
                                      const at::Tensor& r, const at::Tensor& labels,
                                      const at::Tensor& ref_labels, const at::Tensor& self,
                                      const at::Tensor& lse_pos, const at::Tensor& lse_neg,
                                      const at::Tensor& clean_pos, const at::Tensor& clean_neg,
                                      bool cosine, double pos_margin, double neg_margin,
                                      double lam, bool anchor_neg, bool clean, int64_t group,
                                      bool need_dr) {
  RefsCall c(x, r, labels, ref_labels, self, lam, group);
  const auto v = lse_bwd_vectors(c.x, {grad_pos, grad_neg, lse_pos, lse_neg, grad_clean_pos,
                                 grad_clean_neg, clean_pos, clean_neg});
  TwoTensors out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lifted_metrix_refs_bwd_cpu", [&] {
    using T = scalar_t;
    const LiftedMixParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    out = lse_mix_refs_bwd<T, LiftedMixParams<T>>(c, p, lam, anchor_neg, need_dr, clean,
                                                   lse_mix_kernels<T>().lifted_grad, v);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // As circle_metrix_self_fwd / lifted_metrix_self_fwd, for label-sorted unit anchors x
  // against label-sorted unit references r (self[a]: a's own row of r, −1: none, which is
  // not its positive); classes in groups of about `group` entries (ms_metrix_refs_fwd).
  // With `clean`, the third and fourth outputs are lse⁺, lse⁻ of each anchor's clean pairs
  // with the references (its own row no pair; −inf for an empty side), the clean ops'
  // (circle_fwd, gen_lifted_fwd), from the same walk; −inf unless clean.
  m.def("circle_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, float m, float gamma, float lam, bool anchor_neg, bool clean, int group) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("circle_metrix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor grad_clean_pos, "
        "Tensor grad_clean_neg, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, Tensor lse_pos, Tensor lse_neg, Tensor clean_pos, Tensor clean_neg, "
        "float m, float gamma, float lam, bool anchor_neg, bool clean, int group, "
        "bool need_dr) -> (Tensor, Tensor)");
  m.def("lifted_metrix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, bool clean, int group) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lifted_metrix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor grad_clean_pos, "
        "Tensor grad_clean_neg, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, Tensor lse_pos, Tensor lse_neg, Tensor clean_pos, Tensor clean_neg, "
        "bool cosine, float pos_margin, float neg_margin, float lam, bool anchor_neg, "
        "bool clean, int group, bool need_dr) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("circle_metrix_refs_fwd", &circle_metrix_refs_fwd_cpu);
  m.impl("circle_metrix_refs_bwd", &circle_metrix_refs_bwd_cpu);
  m.impl("lifted_metrix_refs_fwd", &lifted_metrix_refs_fwd_cpu);
  m.impl("lifted_metrix_refs_bwd", &lifted_metrix_refs_bwd_cpu);
}

}  // namespace metrix_ops
