// GeneralizedLiftedStructureLoss exponents of one embedding-level Metrix candidate
// v̂ = mix(u, w, λ) (common/metrix_mix.h), over a lane type F, from its metric t and slope k
// (the caller's, lane-wise):
//   L2 (normalised, p = 2): t = d = sqrt(max(2 − 2s̃, 0)), exponents t − m⁺ and m⁻ − t,
//       k = ∂(neg)/∂s̃ = 1/d; coincident candidates (2 − 2s̃ below 16 eps, rounding noise)
//       take d = 0 and k = 0, as cdist and reference/metrix_soft_forms.py::loss_metric;
//   cosine: t = s̃, exponents m⁺ − t and t − m⁻, k = 1
// (PML's margin(x, y), as common/lifted.h). The positive exponent's slope is −k. The label
// weights, the empty-side rule, the hinge and the mean are applied to the per-anchor
// log-sum-exps in PyTorch (metrix_ops/ops/lifted_metrix.py).
#pragma once

#include "common/contrastive_metrix.h"  // con_mix_coincident_below: the same 16 eps rule
#include "common/lse_mix_terms.h"

namespace metrix_ops {

template <typename F, typename T>
MO_LMX LseMixTerms<F> lifted_mix_terms(F t, F k, bool cosine, T pos_margin, T neg_margin) {
  LseMixTerms<F> r;
  r.pos = cosine ? pos_margin - t : t - pos_margin;
  r.neg = cosine ? t - neg_margin : neg_margin - t;
  r.dpos = t * T(0) - k;
  r.dneg = k;
  return r;
}

}  // namespace metrix_ops
