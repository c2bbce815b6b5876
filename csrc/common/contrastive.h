// Contrastive-loss per-pair math on a cosine similarity s of unit rows, shared by host and
// device code (the CPU build tests exactly what a CUDA kernel would compute).
//
// PML's ContrastiveLoss, in its two supported distances:
//   L2 (LpDistance, normalised, p=2): d = sqrt(max(2 − 2s, 0)),
//       positive term [d − m⁺]₊, negative term [m⁻ − d]₊;
//   cosine (inverted, PML's margin(x, y) = y − x): positive [m⁺ − s]₊, negative [s − m⁻]₊.
#pragma once

#include <cmath>
#include <limits>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

// One pair's hinge term, and the distance it came from (d for L2, s for cosine), from
// which contrastive_slope gives the derivative: kept apart so that a backward pass pays the
// square root's division only for the terms it keeps.
template <typename T>
struct PairTerm {
  T value;  // ≥ 0
  T dist;
};

template <typename T>
MO_HD T unit_l2_from_sim(T s) {
  const T q = T(2) - T(2) * s;
  // d² = 2 − 2s carries the rounding of s (a few ulps of 1), so for duplicate rows it is
  // noise of either sign, and √noise (~1e-8 in fp64, ~3e-4 in fp32) would count as a
  // nonzero positive term with a 1/d gradient of pure noise. Below a few ulps it is taken
  // as exactly 0: duplicates then give d = 0 as torch.cdist's direct path does.
  return q > T(8) * std::numeric_limits<T>::epsilon() ? std::sqrt(q) : T(0);
}

// `cosine` picks the distance; `pos` the side. m is that side's margin.
template <typename T>
MO_HD PairTerm<T> contrastive_term(T s, bool cosine, bool pos, T m) {
  PairTerm<T> t;
  t.dist = cosine ? s : unit_l2_from_sim(s);
  // PML's margin(x, y): x − y for a distance, y − x for a similarity
  const T v = (pos != cosine) ? t.dist - m : m - t.dist;
  t.value = v > T(0) ? v : T(0);
  return t;
}

// ∂value/∂s of a term. Zero where the hinge is flat (torch's relu'(0) = 0) and, for L2,
// where d = 0: torch's cdist backward (what the reference and PML differentiate) returns
// 0 there instead of the ±inf of d(√·)/ds, so duplicates give a zero gradient, never NaN.
template <typename T>
MO_HD T contrastive_slope(const PairTerm<T>& t, bool cosine, bool pos) {
  if (!(t.value > T(0))) return T(0);
  if (cosine) return pos ? T(-1) : T(1);
  if (!(t.dist > T(0))) return T(0);
  // dd/ds = −1/d; the positive term grows with d, the negative one shrinks
  return pos ? T(-1) / t.dist : T(1) / t.dist;
}

// The reducer's window on a term: PML's ThresholdReducer keeps low < t < high (AvgNonZero
// is low = 0; Mean and Sum keep every term, low = −inf). Kept terms are summed and counted.
template <typename T>
MO_HD bool in_window(T value, T low, T high) {
  return value > low && value < high;
}

}  // namespace metrix_ops
