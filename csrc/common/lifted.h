// Lifted-structure per-element math (PML's LiftedStructureLoss and
// GeneralizedLiftedStructureLoss) on a cosine similarity s of unit rows, shared by host and
// device code (the CPU build tests exactly what a CUDA kernel would compute).
//
// Both losses are log-sum-exps of PML's margin terms, in one of two distances:
//   L2 (LpDistance, normalised, p=2): t = d = sqrt(max(2 − 2s, 0)),
//       positive exponent t − m⁺, negative exponent m⁻ − t;
//   cosine (inverted, PML's margin(x, y) = y − x): t = s, positive m⁺ − t, negative t − m⁻.
// Either way the positive exponent falls and the negative one rises with s, so a row's
// largest exponents sit at its smallest positive s and its largest negative s.
//
//   GeneralizedLifted, per anchor i: [lse⁺_i + lse⁻_i]₊, a side with no pair giving 0;
//   Lifted, per positive pair (a, p): ½[logaddexp(lse⁻_a, lse⁻_p) + pos exponent]₊², where
//       lse⁻_p is the negative log-sum-exp of *batch row* p (PML's quirk), absent when p is
//       no batch row or is a itself; both absent gives 0.
#pragma once

#include <cmath>
#include <limits>

#include "common/contrastive.h"  // unit_l2_from_sim
#include "common/row_state.h"    // OnlineLse, MO_HD

namespace metrix_ops {

// the pair's distance value t: d (L2, 0 below rounding noise of duplicates) or s (cosine)
template <typename T>
MO_HD T lifted_dist(T s, bool cosine) { return cosine ? s : unit_l2_from_sim(s); }

template <typename T>
MO_HD T lifted_pos_arg(T t, bool cosine, T pos_margin) { return cosine ? pos_margin - t : t - pos_margin; }
template <typename T>
MO_HD T lifted_neg_arg(T t, bool cosine, T neg_margin) { return cosine ? t - neg_margin : neg_margin - t; }

// k(t) with ∂(pos exponent)/∂s = −k and ∂(neg exponent)/∂s = +k: 1 for cosine, 1/d for L2
// (dd/ds = −1/d), and 0 at d = 0, where torch.cdist's backward (what the reference and PML
// differentiate) returns 0 instead of the infinite slope of √·, so duplicates get no
// gradient through their own distance, never NaN.
template <typename T>
MO_HD T lifted_slope(T t, bool cosine) {
  if (cosine) return T(1);
  return t > T(0) ? T(1) / t : T(0);
}

// A finished side's log-sum-exp as PML's masked log-sum-exp reports it: 0 when empty.
template <typename T>
MO_HD T lse_or_zero(T lse) {
  return lse > -std::numeric_limits<T>::infinity() ? lse : T(0);
}

// GeneralizedLifted row loss before the hinge, from the rows' finished log-sum-exps (−inf:
// no pair on that side)
template <typename T>
MO_HD T gen_lifted_pre(T lse_pos, T lse_neg) { return lse_or_zero(lse_pos) + lse_or_zero(lse_neg); }

// ∂(row loss)/∂s of one pair of a GeneralizedLifted row: g·[pre > 0]·softmax weight·(∓k)
template <typename T>
MO_HD T gen_lifted_grad(T s, bool pos, bool cosine, T pos_margin, T neg_margin, T g, T lse_pos,
                        T lse_neg) {
  if (!(gen_lifted_pre(lse_pos, lse_neg) > T(0))) return T(0);  // torch's relu'(0) = 0
  const T t = lifted_dist(s, cosine);
  const T k = lifted_slope(t, cosine);
  return pos ? -g * k * std::exp(lifted_pos_arg(t, cosine, pos_margin) - lse_pos)
             : g * k * std::exp(lifted_neg_arg(t, cosine, neg_margin) - lse_neg);
}

// One positive pair of the (non-generalised) lifted loss: its term ½h₊², h, and the shares
// of its negative log-sum-exp that come from the anchor's and the partner's negatives.
template <typename T>
struct LiftedPair {
  T value;  // ½ max(h, 0)²
  T h;      // lse + pos exponent
  T w_a, w_p;  // ∂lse/∂lse⁻_a, ∂lse/∂lse⁻_p (0 for an absent side)
  T k;      // lifted_slope of the pair's distance
};

// lse_a, lse_p: −inf for an absent side (no negatives, or no partner row)
template <typename T>
MO_HD LiftedPair<T> lifted_pair(T s, T lse_a, T lse_p, bool cosine, T pos_margin) {
  const T inf = std::numeric_limits<T>::infinity();
  const T m = lse_a > lse_p ? lse_a : lse_p;
  LiftedPair<T> r;
  T lse = T(0);
  r.w_a = r.w_p = T(0);
  if (m > -inf) {
    const T ea = std::exp(lse_a - m), ep = std::exp(lse_p - m), tot = ea + ep;
    lse = m + std::log(tot);
    r.w_a = ea / tot;
    r.w_p = ep / tot;
  }
  const T t = lifted_dist(s, cosine);
  r.k = lifted_slope(t, cosine);
  r.h = lse + lifted_pos_arg(t, cosine, pos_margin);
  r.value = r.h > T(0) ? T(0.5) * r.h * r.h : T(0);
  return r;
}

// ∂(½h₊²)/∂h = h₊ (zero where the hinge is flat)
template <typename T>
MO_HD T lifted_dh(const LiftedPair<T>& p) { return p.h > T(0) ? p.h : T(0); }

}  // namespace metrix_ops
