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

// ---- TripletMarginMiner inside the op -------------------------------------------------
// The miner keeps a triplet by its gap g = k_an − k_ap (PML's d_an − d_ap, or s_ap − s_an
// for a similarity: with k = −s the same bits) against its margin m2, compared in T as
// torch compares a tensor with a Python float:
//   all: g ≤ m2;  hard: g ≤ m2 and g ≤ 0;  semihard: 0 < g ≤ m2;  easy: g > m2.
// For a fixed negative, g is non-increasing in k_ap (rounding is monotone), so over the
// sorted positive keys "g ≤ c" holds on a suffix and "g > c" on a prefix: the kept
// positives are a window of sorted ranks, and so are the kept ones with loss > 0.
enum TriMineKind : int { kTriMineAll = 0, kTriMineHard = 1, kTriMineSemihard = 2,
                         kTriMineEasy = 3 };

template <typename T>
MO_HD T tri_gap(T kp, T kn) { return kn - kp; }

// First sorted rank t in [0, n) with gap(kp[t], kn) ≤ c (a suffix starts there); n if none.
template <typename T>
MO_HD long tri_first_gap_le(const T* kp, long n, T kn, T c) {
  long lo = 0, hi = n;
  while (lo < hi) {
    const long mid = lo + (hi - lo) / 2;
    if (tri_gap(kp[mid], kn) <= c) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Ranks [lo, hi) of the sorted positives kept by the miner with negative key kn; hi ≤ lo
// means none.
template <typename T>
MO_HD void tri_mined_window(const T* kp, long n, T kn, int kind, T m2, long* lo, long* hi) {
  switch (kind) {
    case kTriMineAll: *lo = tri_first_gap_le(kp, n, kn, m2); *hi = n; break;
    case kTriMineHard:  // g ≤ m2 and g ≤ 0 is g ≤ min(m2, 0): both compared in T
      *lo = tri_first_gap_le(kp, n, kn, m2 < T(0) ? m2 : T(0)); *hi = n; break;
    case kTriMineSemihard:
      *lo = tri_first_gap_le(kp, n, kn, m2); *hi = tri_first_gap_le(kp, n, kn, T(0)); break;
    default: *lo = 0; *hi = tri_first_gap_le(kp, n, kn, m2); break;  // easy
  }
}

// PML's smooth term (smooth_loss), F.softplus(v) (beta 1, threshold 20), and its derivative
// as torch's softplus backward computes it.
template <typename T>
MO_HD T tri_softplus(T v) { return v > T(20) ? v : std::log1p(std::exp(v)); }
template <typename T>
MO_HD T tri_softplus_grad(T v) {
  if (v > T(20)) return T(1);
  const T z = std::exp(v);
  return z / (z + T(1));
}

// First sorted rank whose triplet with kn has loss > 0 (the active positives: a suffix).
template <typename T>
MO_HD long tri_first_active(const T* kp, long n, T kn, T margin) {
  return n - tri_count_pos(kp, n, kn, margin);
}

}  // namespace metrix_ops
