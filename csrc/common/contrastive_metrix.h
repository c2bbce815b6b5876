// Contrastive-loss terms of one embedding-level Metrix candidate v̂ = mix(u, w, λ) of label λ
// at its cosine s̃ = s(a, v̂) (common/metrix_mix.h), shared by host and device code and
// written over a lane type F (a scalar T, or a GCC vector of T on the CPU):
//   L2 (normalised, p = 2): d = sqrt(max(2 − 2s̃, 0)), λ·[d − m⁺]₊ and (1−λ)·[m⁻ − d]₊;
//   cosine:                  λ·[m⁺ − s̃]₊ and (1−λ)·[s̃ − m⁻]₊
// (PML's margin(x, y) as contrastive.h). The mixed term AvgNonZero-reduces each side over
// all candidates of all anchors (DESIGN §3): a term counts when its value is > 0.
//
// Coincident points (reference/metrix_soft_forms.py::loss_metric): where 2 − 2s̃ is below
// 16 eps it is rounding noise, so d = 0 and the slope is 0, as cdist (PML) gives them: its
// √ (~1e-8) would otherwise count as a nonzero term under AvgNonZero, and the 1/d of
// d(√·)/ds̃ would blow it up into a meaningless gradient. The caller flags such a candidate
// by inv_d = 0 (con_mix_terms then takes d as 0).
#pragma once

#include <cmath>
#include <limits>

#include "common/contrastive.h"

// Forced inline on the host as well: the CPU kernels call these from per-ISA entry points
// (cpu/ms_simd.cpp) with GCC vector lanes, which must be compiled for the caller's target.
#if defined(__CUDACC__)
#define MO_CMX __host__ __device__ __forceinline__
#else
#define MO_CMX inline __attribute__((always_inline))
#endif

namespace metrix_ops {

// The loss's own metric of a candidate on the L2 path: d² = max(2 − 2s̃, 0) (the caller
// takes its square root, lane-wise), and whether d² is far enough from 0 for a slope.
template <typename F, typename T>
MO_CMX F con_mix_sq_dist(F s) {
  const F q = T(2) - T(2) * s;
  return q > T(0) ? q : q * T(0);
}
template <typename T>
MO_CMX T con_mix_coincident_below() {
  return T(16) * std::numeric_limits<T>::epsilon();
}

// A candidate's two terms (label weights included) and their derivatives ∂/∂s̃.
template <typename F>
struct ConMixTerms {
  F pos, neg;    // λ·[·]₊ and (1−λ)·[·]₊, ≥ 0
  F dpos, dneg;  // ∂pos/∂s̃, ∂neg/∂s̃
};

// x: the metric (d for L2, s̃ for cosine); inv_d: 1/d for L2 where it has a slope, else 0,
// which marks a coincident candidate: its d is taken as 0 (unused for cosine).
template <typename F, typename T>
MO_CMX ConMixTerms<F> con_mix_terms(F x, F inv_d, bool cosine, T lam, T pos_margin,
                                   T neg_margin) {
  const F zero = x * T(0);
  if (!cosine) x = inv_d > T(0) ? x : zero;
  const F vp = cosine ? pos_margin - x : x - pos_margin;
  const F vn = cosine ? x - neg_margin : neg_margin - x;
  // ∂x/∂s̃: 1 for cosine, −1/d for L2; the positive side's hinge has slope ∓1 in x
  const F dx = cosine ? zero + T(1) : zero - inv_d;
  ConMixTerms<F> t;
  const T lb = T(1) - lam;
  t.pos = vp > T(0) ? lam * vp : zero;
  t.neg = vn > T(0) ? lb * vn : zero;
  t.dpos = vp > T(0) ? (cosine ? zero - lam : lam * dx) : zero;
  t.dneg = vn > T(0) ? (cosine ? zero + lb : (zero - lb) * dx) : zero;
  return t;
}

}  // namespace metrix_ops

#undef MO_CMX
