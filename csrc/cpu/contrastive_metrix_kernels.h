// The per-element passes of embedding-level Metrix for the contrastive loss (pairs "pos_neg"
// or "anchor_neg") over one block of S whose rows hold whole classes: the candidates and the
// chain rule are MixLanes' (metrix_mix_kernels.h), the per-candidate terms
// common/contrastive_metrix.h's. No exp: a hinge per side, folded into per-anchor sums and
// counts of the nonzero terms (the mixed term AvgNonZero-reduces each side globally; the
// Python side divides the totals). fp32 runs W lanes with a Newton square root (ms_simd.cpp
// instantiates it per ISA), fp64 one lane with std::sqrt.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/contrastive_metrix.h"
#include "cpu/contrastive_blocks.h"
#include "cpu/metrix_mix_kernels.h"

namespace metrix_ops {

template <typename T>
struct ConMixBlock : MixGeom<T> {
  bool cosine;
  T pos_margin, neg_margin;
  // gradient only: per anchor, ∂L/∂(its sum of mixed positive / negative terms)
  const T *g_pos, *g_neg;
};

// Kernels over the anchors [a0, a1) (whole classes, global rows) of one block side: fold
// their candidates' terms into per-anchor sums and counts, or add their terms of ∂L/∂S.
template <typename T>
struct ConMixKernels {
  void (*fold)(const ConMixBlock<T>& b, int64_t a0, int64_t a1, ConAcc* acc);
  void (*grad)(const ConMixBlock<T>& b, int64_t a0, int64_t a1);
};

// The level in use, as ms_kernels_f32 picks it (ms_simd.cpp).
const ConMixKernels<float>& con_mix_kernels_f32();
const ConMixKernels<double>& con_mix_kernels_f64();
template <typename T>
const ConMixKernels<T>& con_mix_kernels();
template <>
inline const ConMixKernels<float>& con_mix_kernels<float>() { return con_mix_kernels_f32(); }
template <>
inline const ConMixKernels<double>& con_mix_kernels<double>() { return con_mix_kernels_f64(); }

#define MO_INLINE inline __attribute__((always_inline))
#define MO_LAMBDA_INLINE __attribute__((always_inline))

template <typename T, int W>
struct ConMixRowKernel {
  using M = MixLanes<T, W>;
  using F = typename M::F;
  using I = typename M::I;
  using R = typename M::R;

  // (√q, 1/√q) of q ≥ 0 per lane. GCC vectors have no sqrt: the bit-trick estimate of
  // 1/√q refined by three Newton steps (relative error 3.4e-2 → 1.7e-3 → 4.5e-6 → ~1 ulp),
  // q·(1/√q) = 0 at q = 0. One lane: std::sqrt.
  static MO_INLINE void sqrt_lanes(F q, F& d, F& inv) {
    if constexpr (W == 1) {
      d = std::sqrt(q);
      inv = T(1) / d;
    } else {
      I i;
      std::memcpy(&i, &q, sizeof(I));
      i = 0x5f375a86 - (i >> 1);
      F y;
      std::memcpy(&y, &i, sizeof(F));
      const F h = T(0.5) * q;
      y = y * (T(1.5) - h * y * y);
      y = y * (T(1.5) - h * y * y);
      y = y * (T(1.5) - h * y * y);
      d = q * y;
      inv = y;
    }
  }

  template <bool Cos>
  static MO_INLINE ConMixTerms<F> terms(const ConMixBlock<T>& b, F v) {
    if constexpr (Cos) {
      return con_mix_terms<F, T>(v, v, true, b.lam, b.pos_margin, b.neg_margin);
    } else {
      const F q = con_mix_sq_dist<F, T>(v);
      F d, inv;
      sqrt_lanes(q, d, inv);
      inv = q >= con_mix_coincident_below<T>() ? inv : q * T(0);
      return con_mix_terms<F, T>(d, inv, false, b.lam, b.pos_margin, b.neg_margin);
    }
  }

  // c += 1 in the lanes of mask. A vector comparison's true lane is −1, so it is subtracted:
  // no select on the combined mask, which GCC lowers one lane at a time under AVX-512
  // (ms_simd.cpp). One lane: a bool.
  template <class Mask>
  static MO_INLINE void count(I& c, Mask mask) {
    if constexpr (W == 1) c += mask ? 1 : 0;
    else c -= mask;
  }

  // Adds anchors [a0, a1)'s terms to acc: per side the sum of the terms and how many are
  // > 0, in double per positive (a row of W-lane partial sums is short)
  template <bool Cos>
  static MO_INLINE void fold_as(const ConMixBlock<T>& b, int64_t a0, int64_t a1, ConAcc* acc) {
    const F zero{};
    for (int64_t a = a0; a < a1; ++a) {
      const T* sa = b.s + (a - b.r0) * b.nc;
      const int32_t la = b.row_lab[a];
      ConAcc out;
      M::for_positives(b, a, [&](int64_t p, T sap) MO_LAMBDA_INLINE {
        F sp{}, sn{};
        I cp{}, cn{};
        M::for_lanes(b, sa, b.inv + (p - b.r0) * b.nc, b.lam * sap, la,
                     [&](int64_t, int64_t, F v, F, auto ok) MO_LAMBDA_INLINE {
          const ConMixTerms<F> t = terms<Cos>(b, v);
          sp += ok ? t.pos : zero;
          sn += ok ? t.neg : zero;
          count(cp, ok & (t.pos > T(0)));
          count(cn, ok & (t.neg > T(0)));
        });
        auto add = [](int64_t x, int64_t y) { return x + y; };
        out.pos_sum += M::sum(sp);
        out.neg_sum += M::sum(sn);
        out.pos_cnt += R::reduce_int(cp, add);
        out.neg_cnt += R::reduce_int(cn, add);
      });
      acc[a].add(out);
    }
  }
  static MO_INLINE void fold(const ConMixBlock<T>& b, int64_t a0, int64_t a1, ConAcc* acc) {
    if (b.cosine) fold_as<true>(b, a0, a1, acc);
    else fold_as<false>(b, a0, a1, acc);
  }

  // w = g_pos[a]·∂pos/∂s̃ + g_neg[a]·∂neg/∂s̃ per candidate
  template <bool Cos>
  struct Weights {
    const ConMixBlock<T>& b;
    MO_INLINE bool active(int64_t a) const {
      return b.g_pos[a] != T(0) || b.g_neg[a] != T(0);
    }
    MO_INLINE auto at(int64_t a) const {
      const T gp = b.g_pos[a], gn = b.g_neg[a];
      const ConMixBlock<T>& blk = b;
      return [gp, gn, &blk](F v) MO_LAMBDA_INLINE {
        const ConMixTerms<F> t = terms<Cos>(blk, v);
        return gp * t.dpos + gn * t.dneg;
      };
    }
  };

  static MO_INLINE void grad(const ConMixBlock<T>& b, int64_t a0, int64_t a1) {
    if (b.cosine) M::grad(b, a0, a1, Weights<true>{b});
    else M::grad(b, a0, a1, Weights<false>{b});
  }
};

// The contrastive constants of the Metrix ops (batch against itself, against references),
// and one block side's ConMixBlock.
template <typename T>
struct ConMix {
  bool cosine;
  T pos_margin, neg_margin;
  const T *g_pos = nullptr, *g_neg = nullptr;

  ConMixBlock<T> side(const MixGeom<T>& geo) const {
    return ConMixBlock<T>{geo, cosine, pos_margin, neg_margin, g_pos, g_neg};
  }
};

#undef MO_INLINE
#undef MO_LAMBDA_INLINE

}  // namespace metrix_ops
