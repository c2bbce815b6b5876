// Proxy-anchor per-element math (PML's form, cosine similarity s of an example and a
// proxy), shared by host and device code so the CPU build tests what CUDA would compute.
// Each proxy c has two terms, log(1 + Σ e^{arg}) over its positives and its negatives.
#pragma once

#include <cmath>

#include "common/lse_acc.h"  // lse_with_one, MO_HD

namespace metrix_ops {

// exponents: positive example −α(s − δ), negative example α(s + δ)
template <typename T>
MO_HD T pa_pos_arg(T s, T alpha, T margin) { return -alpha * (s - margin); }
template <typename T>
MO_HD T pa_neg_arg(T s, T alpha, T margin) { return alpha * (s + margin); }

// d(term)/ds of one entry given its proxy's finished log(1 + Σ e^{arg}) on that side:
// ±α e^{arg − lse} (≤ α, so no overflow whatever the exponents)
template <typename T>
MO_HD T pa_pos_grad(T s, T alpha, T margin, T lse) {
  return -alpha * std::exp(pa_pos_arg(s, alpha, margin) - lse);
}
template <typename T>
MO_HD T pa_neg_grad(T s, T alpha, T margin, T lse) {
  return alpha * std::exp(pa_neg_arg(s, alpha, margin) - lse);
}

// ∂L/∂s of one (proxy c, example of label y) entry: upstream gradients gp, gn of the
// proxy's two terms, lp, ln their values.
template <typename T>
MO_HD T pa_grad(T s, bool positive, T alpha, T margin, T gp, T gn, T lp, T ln) {
  return positive ? gp * pa_pos_grad(s, alpha, margin, lp) : gn * pa_neg_grad(s, alpha, margin, ln);
}

}  // namespace metrix_ops
