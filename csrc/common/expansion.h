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

}  // namespace metrix_ops
