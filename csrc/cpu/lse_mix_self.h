// The op bodies shared by the embedding-level Metrix ops of CircleLoss and
// GeneralizedLiftedStructureLoss (circle_metrix_self_cpu.cpp, lifted_metrix_self_cpu.cpp):
// the batch against itself, label-sorted, walked in blocks cut between classes
// (metrix_blocks.h), each block side's candidates folded into two per-anchor log-sum-exps
// (lse_mix_kernels.h), and with `clean` the clean loss's two log-sum-exps from the same
// blocks, so that it costs no product of its own (see metrix_ops/fused/circle.py).
#pragma once

#include <array>
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

template <typename T, class P>
using LseCleanFold = void (*)(const LseMixBlock<T, P>&, int64_t, int64_t);
template <typename T, class P>
using LseCleanGrad = void (*)(const LseMixBlock<T, P>&, T*, int64_t, int64_t);

// The backward's eight per-anchor vectors (lse_mix_bwd's v), checked, in x's dtype
inline std::vector<at::Tensor> lse_bwd_vectors(const at::Tensor& x,
                                               const std::array<at::Tensor, 8>& t) {
  return row_vectors(x, {{&t[0], "grad_pos"}, {&t[1], "grad_neg"}, {&t[2], "lse_pos"},
                         {&t[3], "lse_neg"}, {&t[4], "grad_clean_pos"},
                         {&t[5], "grad_clean_neg"}, {&t[6], "clean_pos"},
                         {&t[7], "clean_neg"}});
}

// Each row's own column: the self pair, which the clean terms skip (LseClean::own)
inline std::vector<int64_t> own_columns(int64_t B) {
  std::vector<int64_t> own(B);
  for (int64_t a = 0; a < B; ++a) own[a] = a;
  return own;
}

// (lse⁺, lse⁻) per anchor of the label-sorted unit rows x over its candidates (−inf: none),
// then with `clean` those of its clean pairs (−inf for an empty side; everywhere unless
// clean), the clean ones folded from the same blocks of S: each block's rows, and off the
// diagonal its columns through a transposed copy of the block.
template <typename T, class P>
std::vector<at::Tensor> lse_mix_fwd(const at::Tensor& x, const at::Tensor& labels, const P& p,
                                    double lam, bool anchor_neg, int64_t block, bool clean,
                                    LseMixFold<T, P> fold, LseCleanFold<T, P> clean_fold) {
  const at::Tensor ids = ms_label_ids(labels);
  const ClassLayout cls = class_layout(labels, block);
  const int64_t B = x.size(0);
  std::vector<OnlineLse<T>> pos(B, OnlineLse<T>::empty()), neg(B, OnlineLse<T>::empty());
  std::vector<OnlineLse<T>> cpos(B, OnlineLse<T>::empty()), cneg(B, OnlineLse<T>::empty());
  const std::vector<int64_t> own = own_columns(clean ? B : 0);
  const std::vector<T> wc = within_class_cosines<T>(x, cls);
  const MixLayout<T> ml{cls, ids.data_ptr<int32_t>(), wc.data(), T(lam), anchor_neg};
  LseMixBlock<T, P> cb{MixGeom<T>{}, p, nullptr, nullptr, nullptr, nullptr};
  cb.clean = LseClean<T>{own.data(), cpos.data(), cneg.data()};
  metrix_fold_blocks<T>(
      x, ml,
      [&](const MixGeom<T>& geo) {
        return [fold, b = LseMixBlock<T, P>{geo, p, nullptr, nullptr, nullptr, nullptr}, &pos,
                &neg](int64_t a0, int64_t a1) { fold(b, a0, a1, pos.data(), neg.data()); };
      },
      [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
        if (!clean) return;
        auto side = [&](const T* sp, int64_t rr0, int64_t rn, int64_t cc0, int64_t cn) {
          LseMixBlock<T, P> b = cb;
          static_cast<MixGeom<T>&>(b) = ml.geom(sp, nullptr, cn, rr0, cc0, nullptr);
          at::parallel_for(rr0, rr0 + rn, 16,
                           [&](int64_t a0, int64_t a1) { clean_fold(b, a0, a1); });
        };
        side(s.data_ptr<T>(), r0, nr, c0, nc);
        if (c0 != r0) {
          const at::Tensor st = s.t().contiguous();
          side(st.data_ptr<T>(), c0, nc, r0, nr);
        }
      });
  auto [lp, ln] = lse_values<T>(pos, neg, x.options());
  auto [clp, cln] = lse_values<T>(cpos, cneg, x.options());
  return {lp, ln, clp, cln};
}

// dx of Σ_a g⁺_a lse⁺_a + g⁻_a lse⁻_a over the mixed and, with `clean`, the clean lses; v:
// ∂L/∂(mixed lse⁺, lse⁻), the mixed lse⁺, lse⁻, then the same four of the clean ones (all
// per-anchor vectors in x's dtype)
template <typename T, class P>
at::Tensor lse_mix_bwd(const at::Tensor& x, const at::Tensor& labels, const P& p, double lam,
                       bool anchor_neg, int64_t block, bool clean, LseMixGrad<T, P> grad,
                       LseCleanGrad<T, P> clean_grad, const std::vector<at::Tensor>& v) {
  const at::Tensor ids = ms_label_ids(labels);
  const ClassLayout cls = class_layout(labels, block);
  const std::vector<T> wc = within_class_cosines<T>(x, cls);
  std::vector<T> gw(wc.size(), T(0));
  MixLayout<T> ml{cls, ids.data_ptr<int32_t>(), wc.data(), T(lam), anchor_neg};
  ml.gw = gw.data();
  const LseMixBlock<T, P> proto{MixGeom<T>{}, p, v[0].data_ptr<T>(), v[1].data_ptr<T>(),
                                v[2].data_ptr<T>(), v[3].data_ptr<T>()};
  LseMixBlock<T, P> cb = proto;
  if (clean)
    cb.clean = LseClean<T>{nullptr, nullptr, nullptr, v[4].data_ptr<T>(), v[5].data_ptr<T>(),
                           v[6].data_ptr<T>(), v[7].data_ptr<T>()};
  return metrix_grad_blocks<T>(
      x, ml,
      [&](const MixGeom<T>& geo) {
        LseMixBlock<T, P> b = proto;
        static_cast<MixGeom<T>&>(b) = geo;
        return [grad, b](int64_t a0, int64_t a1) { grad(b, a0, a1); };
      },
      // the block's clean H (without clean: 0), to which the walk adds the mixed blocks
      [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
        if (!clean) {
          s.zero_();
          return;
        }
        T* sp = s.data_ptr<T>();
        LseMixBlock<T, P> b = cb;
        static_cast<MixGeom<T>&>(b) = ml.geom(sp, nullptr, nc, r0, c0, nullptr);
        at::parallel_for(0, nr, 16, [&](int64_t i0, int64_t i1) { clean_grad(b, sp, i0, i1); });
      });
}

}  // namespace metrix_ops
