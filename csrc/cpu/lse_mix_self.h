// The op bodies shared by the embedding-level Metrix ops of CircleLoss and
// GeneralizedLiftedStructureLoss (circle_metrix_self_cpu.cpp, lifted_metrix_self_cpu.cpp):
// the batch against itself, label-sorted, walked in blocks cut between classes
// (metrix_blocks.h), each block side's candidates folded into two per-anchor log-sum-exps
// (lse_mix_kernels.h). These ops carry the mixed term only; the clean loss comes from the
// clean op (see metrix_ops/fused/circle.py for the cost of the second pass over S).
#pragma once

#include <vector>

#include <torch/types.h>

#include "cpu/lse_mix_kernels.h"
#include "cpu/metrix_blocks.h"
#include "cpu/ms_blocks.h"
#include "cpu/op_checks.h"

namespace metrix_ops {

template <typename T, class P>
using LseMixFold = void (*)(const LseMixBlock<T, P>&, int64_t, int64_t, OnlineLse<T>*,
                            OnlineLse<T>*);
template <typename T, class P>
using LseMixGrad = void (*)(const LseMixBlock<T, P>&, int64_t, int64_t);

inline void check_lse_mix(const at::Tensor& x, const at::Tensor& labels, double lam,
                          int64_t block) {
  check_self_inputs(x, labels, block);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
}

// The folded states' values as two tensors (lse⁺, lse⁻)
template <typename T>
std::pair<at::Tensor, at::Tensor> lse_values(const std::vector<OnlineLse<T>>& pos,
                                             const std::vector<OnlineLse<T>>& neg,
                                             const at::TensorOptions& options) {
  const int64_t B = static_cast<int64_t>(pos.size());
  at::Tensor lp = at::empty({B}, options), ln = at::empty({B}, options);
  T *lpp = lp.data_ptr<T>(), *lnp = ln.data_ptr<T>();
  for (int64_t a = 0; a < B; ++a) {
    lpp[a] = pos[a].value();
    lnp[a] = neg[a].value();
  }
  return {lp, ln};
}

// (lse⁺, lse⁻) per anchor of the label-sorted unit rows x (−inf: no candidate)
template <typename T, class P>
std::pair<at::Tensor, at::Tensor> lse_mix_fwd(const at::Tensor& x, const at::Tensor& labels,
                                              const P& p, double lam, bool anchor_neg,
                                              int64_t block, LseMixFold<T, P> fold) {
  const at::Tensor ids = ms_label_ids(labels);
  const ClassLayout cls = class_layout(labels, block);
  const int64_t B = x.size(0);
  std::vector<OnlineLse<T>> pos(B, OnlineLse<T>::empty()), neg(B, OnlineLse<T>::empty());
  const std::vector<T> wc = within_class_cosines<T>(x, cls);
  const MixLayout<T> ml{cls, ids.data_ptr<int32_t>(), wc.data(), T(lam), anchor_neg};
  metrix_fold_blocks<T>(
      x, ml,
      [&](const MixGeom<T>& geo) {
        return [fold, b = LseMixBlock<T, P>{geo, p, nullptr, nullptr, nullptr, nullptr}, &pos,
                &neg](int64_t a0, int64_t a1) { fold(b, a0, a1, pos.data(), neg.data()); };
      },
      [](at::Tensor&, int64_t, int64_t, int64_t, int64_t) {});  // no clean term here
  return lse_values<T>(pos, neg, x.options());
}

// dx of Σ_a g⁺_a lse⁺_a + g⁻_a lse⁻_a (all four per-anchor vectors in x's dtype)
template <typename T, class P>
at::Tensor lse_mix_bwd(const at::Tensor& x, const at::Tensor& labels, const P& p, double lam,
                       bool anchor_neg, int64_t block, LseMixGrad<T, P> grad,
                       const at::Tensor& g_pos, const at::Tensor& g_neg,
                       const at::Tensor& lse_pos, const at::Tensor& lse_neg) {
  const at::Tensor ids = ms_label_ids(labels);
  const ClassLayout cls = class_layout(labels, block);
  const std::vector<T> wc = within_class_cosines<T>(x, cls);
  std::vector<T> gw(wc.size(), T(0));
  MixLayout<T> ml{cls, ids.data_ptr<int32_t>(), wc.data(), T(lam), anchor_neg};
  ml.gw = gw.data();
  const LseMixBlock<T, P> proto{MixGeom<T>{}, p, g_pos.data_ptr<T>(), g_neg.data_ptr<T>(),
                                lse_pos.data_ptr<T>(), lse_neg.data_ptr<T>()};
  return metrix_grad_blocks<T>(
      x, ml,
      [&](const MixGeom<T>& geo) {
        LseMixBlock<T, P> b = proto;
        static_cast<MixGeom<T>&>(b) = geo;
        return [grad, b](int64_t a0, int64_t a1) { grad(b, a0, a1); };
      },
      // no clean term: the block's H starts at 0 and takes the mixed blocks only
      [](at::Tensor& s, int64_t, int64_t, int64_t, int64_t) { s.zero_(); });
}

}  // namespace metrix_ops
