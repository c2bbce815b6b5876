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

// One pair's hinge term and its derivative in s. The derivative is 0 where the hinge is
// flat (torch's relu'(0) = 0) and where d = 0: torch's cdist backward (what the reference
// and PML differentiate) returns 0 there instead of the ±inf of d(√·)/ds, so duplicate
// embeddings give a zero gradient, never NaN.
template <typename T>
struct PairTerm {
  T value;  // ≥ 0
  T dvalue_ds;
};

// d² = 2 − 2s carries the rounding of s (a few ulps of 1), so for duplicate rows it is noise
// of either sign, and √noise (~1e-8 in fp64, ~3e-4 in fp32) would count as a nonzero
// positive term and give a 1/d gradient of pure noise. Below a few ulps it is taken as
// exactly 0: duplicates then give d = 0 as torch.cdist's direct path does.
template <typename T>
MO_HD T unit_l2_from_sim(T s) {
  const T q = T(2) - T(2) * s;
  return q > T(8) * std::numeric_limits<T>::epsilon() ? std::sqrt(q) : T(0);
}

// `cosine` picks the distance; `pos` the side. m is that side's margin.
template <typename T>
MO_HD PairTerm<T> contrastive_term(T s, bool cosine, bool pos, T m) {
  PairTerm<T> t;
  if (cosine) {
    const T v = pos ? m - s : s - m;
    t.value = v > T(0) ? v : T(0);
    t.dvalue_ds = v > T(0) ? (pos ? T(-1) : T(1)) : T(0);
    return t;
  }
  const T d = unit_l2_from_sim(s);
  const T v = pos ? d - m : m - d;
  t.value = v > T(0) ? v : T(0);
  // dd/ds = −1/d: the positive term grows with d, the negative one shrinks
  const T dd = d > T(0) ? T(-1) / d : T(0);
  t.dvalue_ds = v > T(0) ? (pos ? dd : -dd) : T(0);
  return t;
}

// The reducer's window on a term: PML's ThresholdReducer keeps low < t < high (AvgNonZero
// is low = 0; Mean and Sum keep every term, low = −inf). Kept terms are summed and counted.
template <typename T>
MO_HD bool in_window(T value, T low, T high) {
  return value > low && value < high;
}

}  // namespace metrix_ops
