// Embedding-level Metrix of the proxy losses: per-element math of a mixed candidate
// v = mix(x_u, x_w, λ) of unit rows against a unit proxy, in closed form (DESIGN §1):
//
//   s(v̂, p_c) = (λ·sp[u,c] + (1−λ)·sp[w,c]) · r_uw,   r_uw = 1 / ‖v‖,
//   ‖v‖² = c0 + c1·G[u,w],  c0 = λ² + (1−λ)²,  c1 = 2λ(1−λ),
//
// with ‖v‖ clamped below at EPS as the reference's mix_norm (a mix of antipodal points has
// no direction). Written over a "lane" type V: the scalar T, or a GCC vector of floats with
// the same operators, so the CPU kernels run it one element or W elements at a time.
#pragma once

// as common/fast_exp.h: vectors wider than the baseline appear only inlined into functions
// compiled for a wider target (before the includes: proxy_anchor.h's helpers take them too)
#if !defined(__CUDACC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <cmath>
#include <limits>

#include "common/proxy_anchor.h"  // pa_pos_arg, pa_neg_arg
#include "common/proxy_nca.h"     // kNcaCosine, kNcaSquaredL2

// The lane-typed helpers are forced inline on the host too: the CPU kernels call them from
// functions compiled for AVX2 (proxy_anchor_metrix_cpu.cpp) with 8-float lanes, which must
// be compiled for that caller's target, not called out of line.
#if defined(__CUDACC__)
#define MO_PMX __host__ __device__ __forceinline__
#else
#define MO_PMX inline __attribute__((always_inline))
#endif

namespace metrix_ops {

// reference/metrix.py's EPS
constexpr double kMixEps = 1e-12;

// 1/‖v‖ from the Gram entry of the pair (scalar: computed once per pair, not per proxy)
template <typename T>
MO_HD T mix_inv_norm(T c0, T c1, T g) {
  T n2 = c0 + c1 * g;
  T n = std::sqrt(n2 > T(0) ? n2 : T(0));
  return T(1) / (n > T(kMixEps) ? n : T(kMixEps));
}

// ∂r/∂G · ‖v‖ = −(c1/2)·r²: ∂s/∂G = s·that, so the Gram entry's gradient is that times
// Σ_c g_c·s_c. Zero where the norm was clamped (the clamp's zero subgradient).
template <typename T>
MO_HD T mix_norm_coef(T c1, T r) {
  return r < T(1.0 / kMixEps) ? -T(0.5) * c1 * r * r : T(0);
}

// the candidate's cosine to a proxy from the two sources' cosines su, sw
template <typename V, typename T>
MO_PMX V mix_cos(T lam, T om, V su, V sw, V r) { return (lam * su + om * sw) * r; }

// Upper bounds on the exponents, the fixed log-sum-exp shifts of the CPU rows (which
// recompute with the row's max where the shifted sum underflows). ProxyAnchor: for |s| ≤ 1
// and log weights ≤ 0, ±α(s ∓ δ) + log w ≤ |α|(1 + |δ|).
template <typename T>
MO_HD T pa_arg_bound(T alpha, T margin) {
  return std::abs(alpha) * (T(1) + std::abs(margin));
}

// ProxyNCA logits: cosine scale·s ≤ |scale|; squared L2 −scale·d², d² ∈ [0, 4] → 0 for
// scale ≥ 0, −4·scale otherwise
template <typename T>
MO_HD T pm_nca_logit_bound(T scale, bool cosine) {
  return cosine ? std::abs(scale) : (scale >= T(0) ? T(0) : T(-4) * scale);
}

// log of a class-mass weight, −inf where there is no such term (weight ≤ 0): the
// reference's _log_weighted, so Σ w·e^{x} is a log-sum-exp of x + log w
template <typename T>
MO_HD T log_weight(T w) {
  return w > T(0) ? std::log(w) : -std::numeric_limits<T>::infinity();
}

// ProxyNCA logit of a cosine s under the loss's metric (reference loss_metric): cosine →
// scale·s; squared L2 of unit vectors → −scale·max(2 − 2s, 0)
template <typename V, typename T>
MO_PMX V pm_nca_logit(V s, T scale, bool cosine) {
  if (cosine) return scale * s;
  V d2 = T(2) - T(2) * s;
  d2 = d2 > T(0) ? d2 : V{} * T(0) + T(0);
  return -scale * d2;
}

// d(logit)/ds; the squared distance's zero subgradient for coincident points (2 − 2s below
// 16 eps), as the reference's loss_metric
template <typename V, typename T>
MO_PMX V pm_nca_dlogit(V s, T scale, bool cosine) {
  if (cosine) return V{} * T(0) + scale;
  const V d2 = T(2) - T(2) * s;
  return d2 < T(16) * std::numeric_limits<T>::epsilon() ? V{} * T(0) : V{} * T(0) + T(2) * scale;
}

}  // namespace metrix_ops
