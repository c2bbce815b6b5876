// CircleLoss per-element math (Sun et al. 2020, PML's pair-label form with cosine
// similarity s), shared by host and device code. With relaxation m: optima O_p = 1 + m,
// O_n = −m, margins Δ_p = 1 − m, Δ_n = m; an anchor's loss is
//   softplus(lse_P(−γ[O_p − s]₊(s − Δ_p)) + lse_N(γ[s − O_n]₊(s − Δ_n)))
// with the weights [·]₊ constants of the step (detached, as the paper and PML).
#pragma once

#include <cmath>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

// The four constants of m, computed in double as PML's Python floats, then cast to T
template <typename T>
struct CircleConsts {
  T gamma, op, on, dp, dn;
};

template <typename T>
inline CircleConsts<T> circle_consts(double m, double gamma) {
  return {T(gamma), T(1 + m), T(-m), T(1 - m), T(m)};
}

// the weights γ[O_p − s]₊ and γ[s − O_n]₊: also the slopes ∓d(logit)/ds
template <typename T>
MO_HD T circle_pos_weight(T s, const CircleConsts<T>& c) {
  return c.gamma * (c.op - s > T(0) ? c.op - s : T(0));
}
template <typename T>
MO_HD T circle_neg_weight(T s, const CircleConsts<T>& c) {
  return c.gamma * (s - c.on > T(0) ? s - c.on : T(0));
}

template <typename T>
MO_HD T circle_pos_logit(T s, const CircleConsts<T>& c) { return -circle_pos_weight(s, c) * (s - c.dp); }
template <typename T>
MO_HD T circle_neg_logit(T s, const CircleConsts<T>& c) { return circle_neg_weight(s, c) * (s - c.dn); }

// torch's Softplus(beta=1, threshold=20): x itself above the threshold; and its derivative
template <typename T>
MO_HD T softplus20(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
template <typename T>
MO_HD T softplus20_grad(T x) { return x > T(20) ? T(1) : T(1) / (T(1) + std::exp(-x)); }

}  // namespace metrix_ops
