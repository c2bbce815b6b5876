// The per-element passes of embedding-level Metrix for the multi-similarity loss (pairs
// "pos_neg" or "anchor_neg") over one block of S whose rows hold whole classes: the
// candidates and the chain rule are the loss-independent MixLanes (metrix_mix_kernels.h);
// here are MS's fold of the candidates into per-anchor log-sum-exps and its per-candidate
// weight ∂ℓ̃/∂s̃. The entry points are instantiated per ISA in ms_simd.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/metrix_mix_kernels.h"

namespace metrix_ops {

template <typename T>
struct MixBlock : MixGeom<T> {
  T alpha, beta, base;
  T shift_pos, shift_neg;  // fixed log-sum-exp shifts of the fold, or +inf: two passes
  // gradient only
  const T *g, *tp, *tn;  // per anchor: ∂L/∂(mixed row), the two log normalisers
};

#define MO_INLINE inline __attribute__((always_inline))
#define MO_LAMBDA_INLINE __attribute__((always_inline))

template <typename T, int W>
struct MixRowKernel {
  using M = MixLanes<T, W>;
  using L = typename M::L;
  using F = typename M::F;
  using I = typename M::I;
  using R = typename M::R;

  static MO_INLINE void exp2_array(const T* x, T* y, int64_t n) {
    for (int64_t j = 0; j < n; j += W) {
      const int64_t m = n - j < W ? n - j : W;
      F v{};
      std::memcpy(&v, x + j, m * sizeof(T));
      v = M::exp2_mix(v);
      std::memcpy(y + j, &v, m * sizeof(T));
    }
  }

  // Folds anchors [a0, a1) (global rows) into their states. With b.shift_pos/neg finite,
  // one pass of Σ e^{arg − shift}: the shifts are fixed per call so that every candidate
  // of cosine s ∈ [−1, 1] neither overflows nor underflows (ms_metrix_shifts), which lets
  // the fp32 exp skip its range handling (exp2_mix). An anchor whose sum still comes
  // out 0 or too large for that bound (a cosine far outside [−1, 1], from a mix of
  // near-antipodal points, clamped at e^88) is redone as MsRowKernel::fold_row does it:
  // the extremes first, then the sums of e^{arg − max arg}.
  static MO_INLINE void fold(const MixBlock<T>& b, int64_t a0, int64_t a1, OnlineLse<T>* pos,
                             OnlineLse<T>* neg) {
    const T inf = std::numeric_limits<T>::infinity();
    const F zero{};
    for (int64_t a = a0; a < a1; ++a) {
      auto over = [&](auto f) MO_LAMBDA_INLINE { M::for_candidates(b, a, f); };
      if (b.shift_pos < inf) {
        // the exponents in base 2: 2^(y·log2 e) = e^y
        const T l2e = T(kLog2eD);
        const T kp = (b.alpha * b.base - b.shift_pos) * l2e, ap = b.alpha * l2e,
                kn = (-b.beta * b.base - b.shift_neg) * l2e, bn = b.beta * l2e;
        F sp{}, sn{};
        over([&](F v, auto ok) MO_LAMBDA_INLINE {
          sp += ok ? M::exp2_mix(kp - ap * v) : zero;
          sn += ok ? M::exp2_mix(bn * v + kn) : zero;
        });
        const T tp = M::sum(sp), tn = M::sum(sn);
        // valid sums are below 2^31·e^60 < 1e37; one clamped 2^127 term is above it. Sums of
        // 0 (no negative of the anchor in these columns: every term is ≥ 2^−126) go on to
        // the two-pass form, which finds no candidate.
        if (tp > T(0) && tp < T(1e37) && tn > T(0) && tn < T(1e37)) {
          pos[a].merge(OnlineLse<T>{b.shift_pos, tp});
          neg[a].merge(OnlineLse<T>{b.shift_neg, tn});
          continue;
        }
      }
      // the extremes of the candidate lanes, one comparison per select (fast_exp.h
      // lane_pick; lane_min/lane_max skip NaN as v < lo did)
      const F pinf = F{} + inf, ninf = F{} - inf;
      F lo = pinf, hi = ninf;
      over([&](F v, auto ok) MO_LAMBDA_INLINE {
        lo = lane_min(lane_pick(ok, v, pinf), lo);
        hi = lane_max(lane_pick(ok, v, ninf), hi);
      });
      const T s_lo = R::reduce(lo, [](T x, T y) { return y < x ? y : x; });
      const T s_hi = R::reduce(hi, [](T x, T y) { return y > x ? y : x; });
      if (!(s_lo < inf)) continue;  // no negative in these columns
      F sp{}, sn{};
      over([&](F v, auto ok) MO_LAMBDA_INLINE {
        sp += ok ? L::exp((zero - b.alpha) * (v - s_lo)) : zero;
        sn += ok ? L::exp(b.beta * (v - s_hi)) : zero;
      });
      pos[a].merge(OnlineLse<T>{ms_pos_arg(s_lo, b.alpha, b.base), M::sum(sp)});
      neg[a].merge(OnlineLse<T>{ms_neg_arg(s_hi, b.beta, b.base), M::sum(sn)});
    }
  }

  // ∂ℓ̃/∂s = −e^{−α(s−base) − tp} + e^{β(s−base) − tn} (tp, tn: the rows' log normalisers,
  // with the label weights λ, 1−λ folded in), times the anchor's upstream gradient
  struct Weights {
    const MixBlock<T>& b;
    MO_INLINE bool active(int64_t a) const { return b.g[a] != T(0); }
    MO_INLINE auto at(int64_t a) const {
      // the exponents β(v − base) − tn and −α(v − base) − tp in base 2, as bn·v − cn and
      // cp − ap·v
      const T l2e = T(kLog2eD), ga = b.g[a];
      const T bn = b.beta * l2e, cn = (b.beta * b.base + b.tn[a]) * l2e;
      const T ap = b.alpha * l2e, cp = (b.alpha * b.base - b.tp[a]) * l2e;
      return [=](F v) MO_LAMBDA_INLINE {
        // both exponents are ≤ ~0 (tp, tn include every term), so clamping below at 2^−126
        // changes a weight by at most 2e-38
        return (M::exp2_mix(bn * v - cn) - M::exp2_mix(cp - ap * v)) * ga;
      };
    }
  };

  // Adds anchors [a0, a1)'s terms of ∂L/∂S into gm and gw (MixLanes::grad)
  static MO_INLINE void grad(const MixBlock<T>& b, int64_t a0, int64_t a1) {
    M::grad(b, a0, a1, Weights{b});
  }
};

#undef MO_INLINE
#undef MO_LAMBDA_INLINE

}  // namespace metrix_ops
