// CircleLoss logits of one embedding-level Metrix candidate v̂ = mix(u, w, λ) at its cosine
// s̃ = s(a, v̂) (common/metrix_mix.h), written over a lane type F (a scalar T, or a GCC vector
// of T on the CPU) with the constants of common/circle.h:
//   positive logit −γ[O_p − s̃]₊(s̃ − Δ_p),  negative logit γ[s̃ − O_n]₊(s̃ − Δ_n),
// and their slopes ∂/∂s̃ with the weights γ[·]₊ held constant (detached, as the clean loss
// and the reference's circle_soft): −γ[O_p − s̃]₊ and γ[s̃ − O_n]₊. The label weights λ and
// 1 − λ, the softplus and the reduction are applied to the per-anchor log-sum-exps in
// PyTorch (metrix_ops/ops/circle_metrix.py).
#pragma once

#include "common/circle.h"
#include "common/lse_mix_terms.h"

namespace metrix_ops {

template <typename F, typename T>
MO_LMX LseMixTerms<F> circle_mix_terms(F v, const CircleConsts<T>& c) {
  const F zero = v * T(0);
  const F wp = c.gamma * ((c.op - v) > T(0) ? c.op - v : zero);
  const F wn = c.gamma * ((v - c.on) > T(0) ? v - c.on : zero);
  LseMixTerms<F> t;
  t.pos = (zero - wp) * (v - c.dp);
  t.neg = wn * (v - c.dn);
  t.dpos = zero - wp;
  t.dneg = wn;
  return t;
}

}  // namespace metrix_ops
