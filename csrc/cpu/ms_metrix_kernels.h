// The per-element passes of embedding-level Metrix for the multi-similarity loss (pairs
// "pos_neg" or "anchor_neg"), over one block of S whose rows hold whole classes: for anchor
// a, every candidate mix(p, n, λ) with p a positive of a (a itself when it has none, or
// always with anchor_neg) and n a negative of a in the block's columns, in closed form (common/metrix_mix.h). Written over
// a lane width W as ms_kernels.h; the entry points are instantiated per ISA in ms_simd.cpp.
//
// Why whole classes per block: a's candidates need row p of S for each positive p, so a's
// positives must be rows of the same block; then the B×M matrix is never needed and the
// mixed term costs no matrix product beyond the clean loss's own.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/metrix_mix.h"
#include "cpu/ms_kernels.h"

namespace metrix_ops {

template <typename T>
struct MixBlock {
  const T* s;    // the block of S: rows r0.. (anchors and their positives), columns c0..
  const T* inv;  // the same shape: 1/‖mix(row, column)‖
  int64_t nc, r0, c0;
  const int32_t* row_lab;  // indexed by global row / column
  const int32_t* col_lab;
  const int64_t* cls_lo;   // global row → first and one-past-last row of its class
  const int64_t* cls_hi;
  const T* wc;             // within-class cosines: row a's at wc + wc_off[a], hi − lo long
  const int64_t* wc_off;
  T lam, alpha, beta, base;
  T shift_pos, shift_neg;  // fixed log-sum-exp shifts of the fold, or +inf: two passes
  bool anchor_neg;         // pairs "anchor_neg": every anchor mixes itself, not a positive
  // gradient only
  const T *g, *tp, *tn;  // per anchor: ∂L/∂(mixed row), the two log normalisers
  T* gm;                 // the block of ∂L/∂S (entries (a, n) and (p, n)), added to
  T* gw;                 // ∂L/∂s_ap, laid out as wc, added to
};

#define MO_INLINE inline __attribute__((always_inline))
#define MO_LAMBDA_INLINE __attribute__((always_inline))

template <typename T, int W>
struct MixRowKernel {
  using L = MsLanes<T, W>;
  using F = typename L::F;
  using I = typename L::I;
  using R = MsRowKernel<T, W>;

  static MO_INLINE bool any_lane(I m) {
    if constexpr (W == 1) {
      return m != 0;
    } else {
      for (int k = 0; k < W; ++k)
        if (m[k]) return true;
      return false;
    }
  }

  // f(p, s_ap) for each positive p of a, or (a, 1) for an anchor without one (and for every
  // anchor with anchor_neg)
  template <class Fn>
  static MO_INLINE void for_positives(const MixBlock<T>& b, int64_t a, Fn f) {
    const int64_t lo = b.cls_lo[a], hi = b.cls_hi[a];
    if (b.anchor_neg || hi - lo == 1) {
      f(a, T(1));
      return;
    }
    const T* w = b.wc + b.wc_off[a];
    for (int64_t p = lo; p < hi; ++p)
      if (p != a) f(p, w[p - lo]);
  }

  // f(j, m, v, ip, ok): W columns at a time, v the candidates' cosines, ip the rows' 1/‖v‖,
  // ok the lanes that are negatives of a (padding lanes are not)
  template <class Fn>
  static MO_INLINE void for_lanes(const MixBlock<T>& b, const T* sa, const T* ip, T ca,
                                  int32_t la, Fn f) {
    const I lanes = R::iota();
    const int32_t n32 = static_cast<int32_t>(b.nc);
    const int32_t* col = b.col_lab + b.c0;
    const T cb = T(1) - b.lam;
    auto group = [&](int64_t j, int64_t m, auto tail) MO_LAMBDA_INLINE {
      F s{}, inv{};
      I c{};
      std::memcpy(&s, sa + j, m * sizeof(T));
      std::memcpy(&inv, ip + j, m * sizeof(T));
      std::memcpy(&c, col + j, m * sizeof(int32_t));
      if constexpr (decltype(tail)::value)  // padding lanes are not candidates
        f(j, m, inv * (ca + cb * s), inv, (c != la) & ((lanes + static_cast<int32_t>(j)) < n32));
      else
        f(j, m, inv * (ca + cb * s), inv, c != la);
    };
    int64_t j = 0;
    for (; j + W <= b.nc; j += W) group(j, W, std::false_type{});
    if (j < b.nc) group(j, b.nc - j, std::true_type{});
  }

  // Folds anchors [a0, a1) (global rows) into their states. With b.shift_pos/neg finite,
  // one pass of Σ e^{arg − shift}: the shifts are fixed per call so that every candidate
  // of cosine s ∈ [−1, 1] neither overflows nor underflows (ms_metrix_shifts), which lets
  // the fp32 exp skip its range handling (exp_clamped). An anchor whose sum still comes
  // out 0 or too large for that bound (a cosine far outside [−1, 1], from a mix of
  // near-antipodal points, clamped at e^88) is redone as MsRowKernel::fold_row does it:
  // the extremes first, then the sums of e^{arg − max arg}.
  static MO_INLINE void fold(const MixBlock<T>& b, int64_t a0, int64_t a1, OnlineLse<T>* pos,
                             OnlineLse<T>* neg) {
    const T inf = std::numeric_limits<T>::infinity();
    const F zero{};
    auto add = [](T x, T y) { return x + y; };
    for (int64_t a = a0; a < a1; ++a) {
      const T* sa = b.s + (a - b.r0) * b.nc;
      const int32_t la = b.row_lab[a];
      auto over = [&](auto f) MO_LAMBDA_INLINE {
        for_positives(b, a, [&](int64_t p, T sap) MO_LAMBDA_INLINE {
          for_lanes(b, sa, b.inv + (p - b.r0) * b.nc, b.lam * sap, la,
                    [&](int64_t, int64_t, F v, F, auto ok) MO_LAMBDA_INLINE { f(v, ok); });
        });
      };
      if (b.shift_pos < inf) {
        const T kp = b.alpha * b.base - b.shift_pos, kn = -b.beta * b.base - b.shift_neg;
        F sp{}, sn{};
        I any{};
        over([&](F v, auto ok) MO_LAMBDA_INLINE {
          sp += ok ? L::exp_clamped(kp - b.alpha * v) : zero;
          sn += ok ? L::exp_clamped(b.beta * v + kn) : zero;
          any |= ok;
        });
        if (!any_lane(any)) continue;  // no negative in these columns
        const T tp = R::reduce(sp, add), tn = R::reduce(sn, add);
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
      pos[a].merge(OnlineLse<T>{ms_pos_arg(s_lo, b.alpha, b.base), R::reduce(sp, add)});
      neg[a].merge(OnlineLse<T>{ms_neg_arg(s_hi, b.beta, b.base), R::reduce(sn, add)});
    }
  }

  // Adds anchors [a0, a1)'s terms of ∂L/∂S into gm (rows a and p, all in this class range)
  // and gw. ∂ℓ̃/∂s = −e^{−α(s−base) − tp} + e^{β(s−base) − tn} (tp, tn: the rows' log
  // normalisers, with the label weights λ, 1−λ folded in), then the chain rule of the mix.
  static MO_INLINE void grad(const MixBlock<T>& b, int64_t a0, int64_t a1) {
    const F zero{};
    const T lam = b.lam, cb = T(1) - lam, thr = T(0.5 / kMixEps);
    for (int64_t a = a0; a < a1; ++a) {
      const T ga = b.g[a];
      if (ga == T(0)) continue;
      const T* sa = b.s + (a - b.r0) * b.nc;
      T* gma = b.gm + (a - b.r0) * b.nc;
      const T tp = b.tp[a], tn = b.tn[a];
      const int64_t lo = b.cls_lo[a];
      for_positives(b, a, [&](int64_t p, T sap) MO_LAMBDA_INLINE {
        T* gmp = b.gm + (p - b.r0) * b.nc;
        F acc{};
        for_lanes(b, sa, b.inv + (p - b.r0) * b.nc, lam * sap, b.row_lab[a],
                  [&](int64_t j, int64_t m, F v, F ip, auto ok) MO_LAMBDA_INLINE {
          // both exponents are ≤ ~0 (tp, tn include every term), so clamping below at
          // ln FLT_MIN changes a weight by at most 1e-38
          F w = ga * (L::exp_clamped(b.beta * (v - b.base) - tn) -
                      L::exp_clamped((zero - b.alpha) * (v - b.base) - tp));
          w = ok ? w : zero;
          F x{};
          std::memcpy(&x, gma + j, m * sizeof(T));
          x += w * cb * ip;
          std::memcpy(gma + j, &x, m * sizeof(T));
          const F coef = (ip < thr) ? (zero - lam * cb) * ip * ip : zero;
          std::memcpy(&x, gmp + j, m * sizeof(T));  // p == a: the row just written
          x += w * v * coef;
          std::memcpy(gmp + j, &x, m * sizeof(T));
          acc += w * ip;
        });
        if (p != a) b.gw[b.wc_off[a] + (p - lo)] += lam * R::reduce(acc, [](T x, T y) { return x + y; });
      });
    }
  }
};

#undef MO_INLINE
#undef MO_LAMBDA_INLINE

}  // namespace metrix_ops
