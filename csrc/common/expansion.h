// Embedding Expansion's synthetic points in closed form from Gram entries (DESIGN §1, §4),
// shared by host and device code. A point is (u, w, k): λ = k/(n+1) on x̂_u, 1 − λ on x̂_w;
// an original i is (i, i, n+1), i.e. λ = 1.
#pragma once

#include <cmath>
#include <limits>

#include "common/row_state.h"  // MO_HD

// always inlined on the host too: ee_arcs_below_lanes takes the vectors of the levels'
// kernels, which must not cross a call (ee_closest.h)
#if defined(__CUDACC__)
#define MO_EEX __host__ __device__ __forceinline__
#else
#define MO_EEX inline __attribute__((always_inline))
#endif

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

// ‖λ x̂_u + (1−λ) x̂_w‖² in the reference's exact association λ(λ g_uu + μ g_uw) + μ(λ g_wu + μ g_ww)
// (rows of H = λ G[:, u] + μ G[:, w], then λ, μ again), with both off-diagonal entries of
// the Gram block as computed (a product XXᵀ need not be bitwise symmetric). Used where the
// gradient has to reach g_uw and g_wu separately, as the reference's does.
template <typename T>
MO_HD T ee_point_sq(T lam, T g_uu, T g_uw, T g_wu, T g_ww) {
  const T mu = T(1) - lam;
  return lam * (lam * g_uu + mu * g_uw) + mu * (lam * g_wu + mu * g_ww);
}

// The reference's safe_sqrt of a squared distance t: 0 (and a zero subgradient) below 16 ulps
// of the unit-norm terms it is computed from, else √max(t, eps).
template <typename T>
MO_HD T ee_safe_sqrt(T t) {
  const T eps = std::numeric_limits<T>::epsilon();
  if (t < T(16) * eps) return T(0);
  return std::sqrt(t < eps ? eps : t);  // NaN stays NaN, as clamp_min
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

// The arc bound: a segment's normalised points all lie on the great circle through x̂_u and
// x̂_w, so a unit a's cosine with any of them is at most the norm of a's projection onto that
// plane, the value at the continuous maximiser μ* of the cosine along the segment (it is
// unimodal along the arc). By Cauchy–Schwarz in the Gram metric G = [[g_uu, g_uw], [g_uw, g_ww]]
// (the entries the coefficients are built from, ee_point_norm):
//     (λ s_au + (1−λ) s_aw)² / ‖v‖² ≤ bᵀ G⁻¹ b,   b = (s_au, s_aw),   for every λ.
// EeArc holds G⁻¹ = [[p, −q], [−q, r]]: p = g_ww/det, q = g_uw/det, r = g_uu/det. Segments with
// det < ¼ (|cos| > √3/2: near-duplicate or near-antipodal endpoints, zero or NaN rows) get NaN
// and are never skipped on it; for the others 1/‖v‖ ≤ 4 and the rounding of ee_mix_sim and of
// bᵀG⁻¹b stay a few hundred ulps, well inside the slack of ee_arc_below.
template <typename T>
struct EeArc {
  T p, q, r;
};

template <typename T>
MO_HD EeArc<T> ee_arc(T g_uu, T g_uw, T g_ww) {
  const T det = g_uu * g_ww - g_uw * g_uw;
  if (!(det >= T(0.25))) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    return {nan, nan, nan};
  }
  return {g_ww / det, g_uw / det, g_uu / det};
}

// True when every point of the segment, as ee_mix_sim computes it, is strictly below `best`
// (so none can win, ties included): the arc bound with a relative slack of 4096 ulps.
template <typename T>
MO_HD bool ee_arc_below(const EeArc<T>& c, T s_au, T s_aw, T best) {
  const T sl = T(4096) * std::numeric_limits<T>::epsilon();
  const T lo = best - sl * (std::abs(s_au) + std::abs(s_aw));
  const T b2 = c.p * s_au * s_au - T(2) * c.q * s_au * s_aw + c.r * s_aw * s_aw;
  return lo > T(0) && b2 * (T(1) + sl) < lo * lo;
}

// The pair-of-arcs bound: the points of segment e = (i, j) lie on the great circle through
// x̂_i, x̂_j and those of f = (k, l) on the one through x̂_k, x̂_l, so the cosine of any point of
// e with any point of f is at most σ, the largest singular value of the cross cosines
// M = [[s_ik, s_il], [s_jk, s_jl]] in the two circles' metrics:
//     σ² = λ₁ of A = G_e⁻¹ M G_f⁻¹ Mᵀ,   tr A = tr(G_e⁻¹ Q) with Q = M G_f⁻¹ Mᵀ,
//     det A = det(M)² det(G_e⁻¹) det(G_f⁻¹),   both eigenvalues ≥ 0.
// One test covers a segment's n points against another's n, where ee_arc_below takes one
// point at a time. With L = lo², λ₁ < L exactly when L > tr/2 and p(L) = L² − tr·L + det > 0
// (L lies above both roots of A's characteristic polynomial): no square root. True when
// every such cosine, as ee_mix_sim computes it (coefficients from the same Gram entries), is
// strictly below `best`. Computed in double, lanes or scalars (D: double or a GCC vector of
// doubles, for the vectorised filter in ee_closest.h): near a double root p(L)'s rounding
// moves the decision by ~1e-7 relative in L, inside the slack `sl` (ee_arcs_slack: at least
// 4e-6; det G ≥ ¼ bounds every factor). NaN (a segment without an arc bound, a NaN cosine)
// gives false: never skipped.
template <typename D>
MO_EEX auto ee_arcs_below_lanes(D pe, D qe, D re, D pf, D qf, D rf, D ik, D il, D jk, D jl,
                               D best, double sl) {
  const D q11 = pf * ik * ik - 2.0 * qf * ik * il + rf * il * il;
  const D q22 = pf * jk * jk - 2.0 * qf * jk * jl + rf * jl * jl;
  const D q12 = pf * ik * jk - qf * (ik * jl + il * jk) + rf * il * jl;
  const D tr = pe * q11 - 2.0 * qe * q12 + re * q22;
  const D dm = ik * jl - il * jk;
  const D det = dm * dm * (pe * re - qe * qe) * (pf * rf - qf * qf);
  const D mag = (ik < 0.0 ? -ik : ik) + (il < 0.0 ? -il : il) + (jk < 0.0 ? -jk : jk) +
                (jl < 0.0 ? -jl : jl);
  const D lo = best - sl * mag;
  const D L = lo * lo * (1.0 - sl);
  return (lo > 0.0) & (tr < 2.0 * L) & (L * L - tr * L + det > 0.0);
}

template <typename T>
MO_HD double ee_arcs_slack() {
  const double s = 4096 * double(std::numeric_limits<T>::epsilon());
  return s > 4e-6 ? s : 4e-6;
}

template <typename T>
MO_HD bool ee_arcs_below(const EeArc<T>& e, const EeArc<T>& f, T s_ik, T s_il, T s_jk, T s_jl,
                         T best) {
  return ee_arcs_below_lanes<double>(e.p, e.q, e.r, f.p, f.q, f.r, s_ik, s_il, s_jk, s_jl, best,
                                     ee_arcs_slack<T>());
}

// TripletMarginLoss's term f(v) with EE (relu, or F.softplus: linear past threshold 20) and
// its derivative, for the CPU and CUDA ee_triplet ops.
template <typename T>
MO_HD T ee_trip_f(T v, bool smooth) {  // F.softplus: linear past threshold 20
  if (!smooth) return v > T(0) ? v : T(0);
  return v > T(20) ? v : std::log1p(std::exp(v));
}

template <typename T>
MO_HD T ee_trip_df(T v, bool smooth) {
  if (!smooth) return v > T(0) ? T(1) : T(0);
  return v > T(20) ? T(1) : T(1) / (T(1) + std::exp(-v));
}

}  // namespace metrix_ops
