// The per-element passes of embedding-level Metrix for the multi-similarity loss (pairs
// "pos_neg" or "anchor_neg") over one block of S whose rows hold whole classes: the
// candidates and the chain rule are the loss-independent MixLanes (metrix_mix_kernels.h);
// here are MS's fold of the candidates into per-anchor log-sum-exps and its per-candidate
// weight ∂ℓ̃/∂s̃. The entry points are instantiated per ISA in ms_simd.cpp.
#pragma once

#include <cmath>
#include <cstdint>
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

  // e^x for the one-pass fold and the weights, two per candidate (most of its cost), with
  // x clamped into [−87, 88] first: never 0 or inf, as fast_exp_clamped (whose callers
  // bound or check the sums), but in that range n = round(x·log2 e) ∈ [−126, 127] and
  // e^(x − n ln 2) ∈ [0.7, 1.42] make 2^n one normal exponent field (one scale, not
  // fast_exp's two), and a degree-5 polynomial (relative error 1.7e-7, about 3 ulp, against
  // the fp32 contract's 1e-4; coefficients fitted to e^r on |r| ≤ ln2/2). fp64: std::exp.
  static MO_INLINE F exp_mix(F x) {
    if constexpr (W == 1) {
      return std::exp(x);
    } else {
      using namespace fexp;
      const F lo = F{} - 87.0f, hi = F{} + 88.0f;
      x = x < lo ? lo : x;
      x = x > hi ? hi : x;
      const F t = x * kLog2e + kRound;  // low mantissa bits: n
      const F n = t - kRound;
      const F r = (x - n * kLn2Hi) - n * kLn2Lo;
      F p = F{} + 8.333842270076275e-3f;
      p = p * r + 4.189859703183174e-2f;
      p = p * r + 1.666688621044159e-1f;
      p = p * r + 4.999914169311523e-1f;
      p = p * (r * r) + r + 1.0f;
      // the bits of kRound (1.5·2^23 = 0x4B400000) less the exponent bias; a literal rather
      // than std::bit_cast, which older standard libraries (GCC < 11) lack
      constexpr int32_t bias = 0x4B400000 - 127;
      return p * as_float<F>((as_int<I>(t) - bias) << 23);
    }
  }

  // Folds anchors [a0, a1) (global rows) into their states. With b.shift_pos/neg finite,
  // one pass of Σ e^{arg − shift}: the shifts are fixed per call so that every candidate
  // of cosine s ∈ [−1, 1] neither overflows nor underflows (ms_metrix_shifts), which lets
  // the fp32 exp skip its range handling (exp_mix). An anchor whose sum still comes
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
        const T kp = b.alpha * b.base - b.shift_pos, kn = -b.beta * b.base - b.shift_neg;
        F sp{}, sn{};
        I any{};
        over([&](F v, auto ok) MO_LAMBDA_INLINE {
          sp += ok ? exp_mix(kp - b.alpha * v) : zero;
          sn += ok ? exp_mix(b.beta * v + kn) : zero;
          any |= ok;
        });
        if (!M::any_lane(any)) continue;  // no negative in these columns
        const T tp = M::sum(sp), tn = M::sum(sn);
        // valid sums are below 2^31·e^60 < 1e37; one clamped e^88 term is above it
        if (tp > T(0) && tp < T(1e37) && tn > T(0) && tn < T(1e37)) {
          pos[a].merge(OnlineLse<T>{b.shift_pos, tp});
          neg[a].merge(OnlineLse<T>{b.shift_neg, tn});
          continue;
        }
      }
      F lo = F{} + inf, hi = F{} - inf;
      over([&](F v, auto ok) MO_LAMBDA_INLINE {
        lo = (ok & (v < lo)) ? v : lo;
        hi = (ok & (v > hi)) ? v : hi;
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
      const T ga = b.g[a], tp = b.tp[a], tn = b.tn[a], alpha = b.alpha, beta = b.beta,
              base = b.base;
      return [=](F v) MO_LAMBDA_INLINE {
        const F zero{};
        // both exponents are ≤ ~0 (tp, tn include every term), so clamping below at −87
        // changes a weight by at most 2e-38
        return ga * (exp_mix(beta * (v - base) - tn) -
                     exp_mix((zero - alpha) * (v - base) - tp));
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
