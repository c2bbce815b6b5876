// Triplet-margin per-element math, shared by host and device code (the CPU build tests
// exactly what a CUDA backend would compute).
//
// Both supported distances are mapped to one "key" k, larger = farther, from the block
// value v the backend computes, with the violation of a triplet (a, p, n) written as PML:
//   L2 on unit rows:  v = d (as torch.cdist computes it), k = d,  violation = (d_ap − d_an) + m
//   cosine:           v = s,                              k = −s, violation = (s_an − s_ap) + m
// −s is exact, so (k_ap − k_an) + m is bit-for-bit PML's cosine violation as well. Keeping
// PML's operation order (difference first, then + m) matters: it decides which boundary
// triplets are exactly 0, and AvgNonZero counts only those > 0.
#pragma once

#include <cmath>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

template <typename T>
MO_HD T tri_key(T v, bool cosine) { return cosine ? -v : v; }

// L2 distance of unit rows from their cosine, d = sqrt(max(2 − 2s, 0)), for a backend that
// has only S (the CPU op uses torch.cdist's own values instead, see triplet_cpu.cpp).
template <typename T>
MO_HD T tri_dist_from_sim(T s) {
  const T d2 = T(2) - T(2) * s;
  return d2 > T(0) ? std::sqrt(d2) : T(0);
}

// dk/ds, the chain to S = X Rᵀ (dd/ds = −1/d on unit rows). At d = 0 (duplicate rows) it is
// infinite; torch's distance backward gives 0 there (zero distances are masked) and so do
// we: no NaN, no inf.
template <typename T>
MO_HD T tri_key_grad(T k, bool cosine) {
  if (cosine) return T(-1);
  return k > T(0) ? T(-1) / k : T(0);
}

// PML's hinge argument for keys kp (positive) and kn (negative).
template <typename T>
MO_HD T tri_violation(T kp, T kn, T margin) { return (kp - kn) + margin; }

// Whether the triplet has loss > 0. Monotone: non-increasing in kn, non-decreasing in kp
// (rounding is monotone), so over sorted positive keys the positives active with a given
// negative form a suffix and can be counted by binary search.
template <typename T>
MO_HD bool tri_active(T kp, T kn, T margin) { return tri_violation(kp, kn, margin) > T(0); }

// Number of sorted-ascending positive keys kp[0..n) active with negative key kn: a suffix.
// The two ends are tested first: most negatives of a trained embedding are active with no
// positive (or, for hard anchors, with all), which then costs two comparisons.
template <typename T>
MO_HD long tri_count_pos(const T* kp, long n, T kn, T margin) {
  if (n == 0 || !tri_active(kp[n - 1], kn, margin)) return 0;
  if (tri_active(kp[0], kn, margin)) return n;
  long lo = 1, hi = n - 1;  // first active index lies in [1, n-1]
  while (lo < hi) {
    const long mid = lo + (hi - lo) / 2;
    if (tri_active(kp[mid], kn, margin)) hi = mid;
    else lo = mid + 1;
  }
  return n - lo;
}

}  // namespace metrix_ops
