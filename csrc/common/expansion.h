// Embedding Expansion's synthetic points in closed form from Gram entries (DESIGN §1, §4),
// shared by host and device code. A point is (u, w, k): λ = k/(n+1) on x̂_u, 1 − λ on x̂_w;
// an original i is (i, i, n+1), i.e. λ = 1.
#pragma once

#include <cmath>
#include <limits>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

// λ_k = k/(n+1), computed in double and rounded once, as the reference's float64 grid.
template <typename T>
MO_HD T ee_lambda(long k, long n) { return T(double(k) / double(n + 1)); }

// ‖λ x̂_u + (1−λ) x̂_w‖ from g_uu, g_uw, g_ww, in the reference's association
// (λ(λ g_uu + (1−λ) g_uw) + (1−λ)(λ g_uw + (1−λ) g_ww)), clamped at the smallest normal
// so that antipodal endpoints at λ = ½ give a finite (huge) 1/‖v‖, not inf·0.
template <typename T>
MO_HD T ee_point_norm(T lam, T g_uu, T g_uw, T g_ww) {
  const T mu = T(1) - lam;
  const T sq = lam * (lam * g_uu + mu * g_uw) + mu * (lam * g_uw + mu * g_ww);
  const T tiny = std::numeric_limits<T>::min();
  return std::sqrt(sq > tiny ? sq : tiny);
}

// Cosine of a fixed unit point a with the normalised point (u, w, λ), given a's cosines
// s_au, s_aw with the endpoints and the point's coefficients cu = λ/‖v‖, cw = (1−λ)/‖v‖.
template <typename T>
MO_HD T ee_mix_sim(T cu, T cw, T s_au, T s_aw) { return cu * s_au + cw * s_aw; }

// An upper bound of ee_mix_sim over a segment's points, as computed in floating point: with
// cu, cw ≥ 0, cu·s_au + cw·s_aw ≤ (cu + cw)·max(s_au, s_aw), and cu + cw lies in
// [wmin, wmax]; the relative slack covers the rounding of the products and the sum, so a
// segment whose bound is below the best so far can be skipped without changing any pick.
// NaN gives NaN, which compares false: such a segment is never skipped.
template <typename T>
MO_HD T ee_mix_bound(T wmin, T wmax, T s_au, T s_aw) {
  const T m = s_au > s_aw ? s_au : s_aw;
  const T b = m >= T(0) ? m * wmax : m * wmin;
  const T slack = T(16) * std::numeric_limits<T>::epsilon();
  return b + (b >= T(0) ? b : -b) * slack + std::numeric_limits<T>::min();
}

}  // namespace metrix_ops
