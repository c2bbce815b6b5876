// The loss-independent part of the embedding-level Metrix kernels (pairs "pos_neg" or
// "anchor_neg", DESIGN §3) over one block of S whose rows hold whole classes: for anchor a,
// every candidate mix(p, n, λ) with p a positive of a (a itself when it has none, or always
// with anchor_neg) and n a negative of a in the block's columns, its cosine in closed form
// (common/metrix_mix.h), and the chain rule that takes a per-candidate weight w = ∂L/∂s̃
// back into the Gram entries (a, n), (p, n) and s_ap. Written over a lane width W as
// ms_kernels.h; each loss supplies its per-candidate term (ms_metrix_kernels.h,
// contrastive_metrix_kernels.h), and the entry points are instantiated per ISA in ms_simd.cpp.
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

// One side of a block: what every loss's Metrix kernel needs to walk its candidates. The
// walk (metrix_blocks.h) gives one class at a time: its rows of S, or of Sᵀ gathered.
template <typename T>
struct MixGeom {
  const T* s;    // the block of S: rows r0.. (anchors and their positives), columns c0..
  const T* inv;  // the same shape: 1/‖mix(row, column)‖
  int64_t nc, r0, c0;
  const int32_t* row_lab;  // indexed by global row / column
  const int32_t* col_lab;
  const int64_t* cls_lo;   // global row → first and one-past-last row of its class
  const int64_t* cls_hi;
  const T* wc;             // within-class cosines: row a's at wc + wc_off[a], hi − lo long
  const int64_t* wc_off;
  T lam;
  bool anchor_neg;         // pairs "anchor_neg": every anchor mixes itself, not a positive
  // gradient only
  T* gm;  // the block of ∂L/∂S (entries (a, n) and (p, n)), added to
  T* gw;  // ∂L/∂s_ap, laid out as wc, added to
  // per anchor, the one row of [cls_lo, cls_hi) that is not its positive (−1: none); null:
  // the anchor itself (the batch against itself). Against references (metrix_refs_walk.h)
  // an anchor's positives are rows of another matrix, placed after the anchors' rows, and
  // the anchor's own slot among them (a bank that holds the batch) is not a positive.
  const int64_t* self_row = nullptr;
};

#define MO_INLINE inline __attribute__((always_inline))
#define MO_LAMBDA_INLINE __attribute__((always_inline))

constexpr double kLog2eD = 1.4426950408889634;  // log2 e

template <typename T, int W>
struct MixLanes {
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

  static MO_INLINE T sum(F v) { return R::reduce(v, [](T x, T y) { return x + y; }); }

  // 2^y for the Metrix kernels' per-candidate exps (MS's one-pass fold and weights, two per
  // candidate, most of their cost; Circle's and GeneralizedLifted's, lse_mix_kernels.h); the
  // callers scale their exponents by log2 e once per anchor, so that the range reduction is
  // exact: n = round(y), r = y − n ∈ [−½, ½] (one subtraction, no ln 2 split), 2^r by a
  // degree-5 polynomial (Horner; coefficients fitted to 2^r on |r| ≤ ½ in relative error:
  // 1.9e-7 with fp32 rounding; tests/test_fast_exp.py measures ≤ 2.2 ulp, against the fp32
  // contract's 1e-4), and 2^n added into the exponent field of 2^r as an integer. y is
  // clamped into [−126, 127] first (lane_max and lane_min): never 0 or inf, as
  // fast_exp_clamped (whose callers bound or check the sums), and in that range 2^r·2^n is a normal number (n = −126 only with
  // r ≥ 0, n = 127 only with r ≤ 0). Twelve vector operations, where the e^x it replaced
  // took seventeen with its clamps (GCC's compare-and-blend for each). fp64: std::exp2.
  static MO_INLINE F exp2_mix(F y) {
    if constexpr (W == 1) {
      return std::exp2(y);
    } else {
      using namespace fexp;
      typedef uint32_t U __attribute__((vector_size(4 * W)));
      const F lo = F{} - 126.0f, hi = F{} + 127.0f;
      y = lane_min(lane_max(y, lo), hi);
      const F t = y + kRound;  // low mantissa bits: n
      const F r = y - (t - kRound);
      F p = F{} + 1.326472731307149e-3f;
      p = p * r + 9.671512991189957e-3f;
      p = p * r + 5.550733581185341e-2f;
      p = p * r + 2.402224242687225e-1f;
      p = p * r + 6.931470036506653e-1f;
      p = p * r + 1.0f;
      // the bits of t are those of 1.5·2^23 plus n, and 1.5·2^23's shifted out of the top:
      // t << 23 is n << 23 (mod 2^32), the exponent of 2^n
      return as_float<F>(as_int<U>(p) + (as_int<U>(t) << 23));
    }
  }

  // f(p, s_ap) for each positive p of a, or (a, 1) for an anchor without one (and for every
  // anchor with anchor_neg)
  template <class Fn>
  static MO_INLINE void for_positives(const MixGeom<T>& b, int64_t a, Fn f) {
    const int64_t lo = b.cls_lo[a], hi = b.cls_hi[a];
    const int64_t self = b.self_row ? b.self_row[a] : a;
    if (b.anchor_neg || hi - lo == (self >= lo && self < hi ? 1 : 0)) {
      f(a, T(1));
      return;
    }
    const T* w = b.wc + b.wc_off[a];
    for (int64_t p = lo; p < hi; ++p)
      if (p != self) f(p, w[p - lo]);
  }

  // f(j, m, v, ip, ok): W columns at a time, v the candidates' cosines, ip the rows' 1/‖v‖,
  // ok the lanes that are negatives of a (padding lanes are not)
  template <class Fn>
  static MO_INLINE void for_lanes(const MixGeom<T>& b, const T* sa, const T* ip, T ca,
                                  int32_t la, Fn f) {
    const int32_t* col = b.col_lab + b.c0;
    const T cb = T(1) - b.lam;
    auto group = [&](int64_t j, int64_t m) MO_LAMBDA_INLINE {
      F s{}, inv{};
      // padding lanes keep the anchor's own label, so they are no candidates (no second mask
      // for the tail)
      I c = I{} + la;
      std::memcpy(&s, sa + j, m * sizeof(T));
      std::memcpy(&inv, ip + j, m * sizeof(T));
      std::memcpy(&c, col + j, m * sizeof(int32_t));
      f(j, m, inv * (ca + cb * s), inv, c != la);
    };
    int64_t j = 0;
    for (; j + W <= b.nc; j += W) group(j, W);
    if (j < b.nc) group(j, b.nc - j);
  }

  // f(v, ok) for every candidate of anchor a in this block, W at a time
  template <class Fn>
  static MO_INLINE void for_candidates(const MixGeom<T>& b, int64_t a, Fn f) {
    const T* sa = b.s + (a - b.r0) * b.nc;
    const int32_t la = b.row_lab[a];
    for_positives(b, a, [&](int64_t p, T sap) MO_LAMBDA_INLINE {
      for_lanes(b, sa, b.inv + (p - b.r0) * b.nc, b.lam * sap, la,
                [&](int64_t, int64_t, F v, F, auto ok) MO_LAMBDA_INLINE { f(v, ok); });
    });
  }

  // Adds anchors [a0, a1)'s terms of ∂L/∂S into gm (rows a and p, all in this class range)
  // and gw. The loss gives them per anchor: wt.active(a) (false: a's candidates carry no
  // gradient) and wt.at(a), a function of the candidates' cosines v to w = ∂L/∂s̃ per lane
  // (the lanes that are not candidates are masked here). Then the chain rule of the mix:
  // ∂s̃/∂s_an = (1−λ)/‖v‖, ∂s̃/∂s_pn = −s̃ λ(1−λ)/‖v‖² (0 where ‖v‖ is clamped),
  // ∂s̃/∂s_ap = λ/‖v‖.
  template <class Weights>
  static MO_INLINE void grad(const MixGeom<T>& b, int64_t a0, int64_t a1, const Weights& wt) {
    const F zero{};
    const T lam = b.lam, cb = T(1) - lam, thr = T(0.5 / kMixEps);
    for (int64_t a = a0; a < a1; ++a) {
      if (!wt.active(a)) continue;
      const auto w_of = wt.at(a);
      const T* sa = b.s + (a - b.r0) * b.nc;
      T* gma = b.gm + (a - b.r0) * b.nc;
      const int64_t lo = b.cls_lo[a];
      for_positives(b, a, [&](int64_t p, T sap) MO_LAMBDA_INLINE {
        T* gmp = b.gm + (p - b.r0) * b.nc;
        F acc{};
        for_lanes(b, sa, b.inv + (p - b.r0) * b.nc, lam * sap, b.row_lab[a],
                  [&](int64_t j, int64_t m, F v, F ip, auto ok) MO_LAMBDA_INLINE {
          F w = w_of(v);
          w = ok ? w : zero;
          const F u = w * ip;  // w/‖v‖, the factor every entry's term shares
          F x{};
          std::memcpy(&x, gma + j, m * sizeof(T));
          x += cb * u;
          std::memcpy(gma + j, &x, m * sizeof(T));
          const F coef = (ip < thr) ? (zero - lam * cb) * ip : zero;
          std::memcpy(&x, gmp + j, m * sizeof(T));  // p == a: the row just written
          x += u * v * coef;
          std::memcpy(gmp + j, &x, m * sizeof(T));
          acc += u;
        });
        if (p != a) b.gw[b.wc_off[a] + (p - lo)] += lam * sum(acc);
      });
    }
  }
};

#undef MO_INLINE
#undef MO_LAMBDA_INLINE

}  // namespace metrix_ops
