// The per-element passes of embedding-level Metrix (pairs "pos_neg" or "anchor_neg") for the
// losses whose mixed term is a function of two per-anchor log-sum-exps over the candidates,
// lse⁺(a) = log Σ_v e^{pos(s̃_v)} and lse⁻(a) = log Σ_v e^{neg(s̃_v)} (CircleLoss,
// GeneralizedLiftedStructureLoss; common/lse_mix_terms.h). The candidates and the chain rule
// are MixLanes' (metrix_mix_kernels.h) as for MS and contrastive; what differs from MS's
// kernels (ms_metrix_kernels.h) is that the exponents have no fixed range to shift by
// (Circle's γ = 80 spans e^{±300} over s̃ ∈ [−1, 1]), so every anchor takes two passes over
// its candidates: the maxima, then the sums of e^{x − max}. The label weights, empty sides,
// softplus / hinge and reductions stay in PyTorch on these two per-anchor values, so the
// kernels know nothing of λ's role in the loss. Instantiated per ISA in lse_mix_simd.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/circle_metrix.h"
#include "common/lifted_metrix.h"
#include "cpu/contrastive_metrix_kernels.h"  // ConMixRowKernel::sqrt_lanes
#include "cpu/metrix_mix_kernels.h"

namespace metrix_ops {

template <typename T>
struct LiftedMixParams {
  bool cosine;
  T pos_margin, neg_margin;
};

// The clean terms of the same anchors, where a walk's tile holds their rows of S = X R_cᵀ
// (metrix_refs_walk.h: anchors against references) and the op folds both terms from it:
// each anchor's pairs with the tile's columns, its own slot own[a] (a global column, −1:
// none) no pair, into its own two states (forward) or their entries of ∂L/∂S (backward,
// from these per-anchor gradients and finished values). own null: no clean term.
template <typename T>
struct LseClean {
  const int64_t* own = nullptr;
  OnlineLse<T>*pos = nullptr, *neg = nullptr;
  const T *g_pos = nullptr, *g_neg = nullptr, *lse_pos = nullptr, *lse_neg = nullptr;
};

// One block side (MixGeom) with the loss's constants P.
template <typename T, class P>
struct LseMixBlock : MixGeom<T> {
  P p;
  // gradient only, per anchor: ∂L/∂lse⁺, ∂L/∂lse⁻, and the finished lse⁺, lse⁻
  const T *g_pos, *g_neg, *lse_pos, *lse_neg;
  LseClean<T> clean{};
};

template <typename T>
using CircleMixBlock = LseMixBlock<T, CircleConsts<T>>;
template <typename T>
using LiftedMixBlock = LseMixBlock<T, LiftedMixParams<T>>;

// Kernels over the anchors [a0, a1) (whole classes, global rows) of one block side: fold
// their candidates into the anchors' two log-sum-exp states, or add their terms of ∂L/∂S.
template <typename T>
struct LseMixKernels {
  void (*circle_fold)(const CircleMixBlock<T>& b, int64_t a0, int64_t a1, OnlineLse<T>* pos,
                      OnlineLse<T>* neg);
  void (*circle_grad)(const CircleMixBlock<T>& b, int64_t a0, int64_t a1);
  void (*lifted_fold)(const LiftedMixBlock<T>& b, int64_t a0, int64_t a1, OnlineLse<T>* pos,
                      OnlineLse<T>* neg);
  void (*lifted_grad)(const LiftedMixBlock<T>& b, int64_t a0, int64_t a1);
  // The clean pairs of the batch against itself (lse_mix_self.h): fold anchors [a0, a1)'s
  // rows of a block into b.clean's states; turn rows [i0, i1) of a block into its clean H
  void (*circle_clean_fold)(const CircleMixBlock<T>& b, int64_t a0, int64_t a1);
  void (*circle_clean_grad)(const CircleMixBlock<T>& b, T* s, int64_t i0, int64_t i1);
  void (*lifted_clean_fold)(const LiftedMixBlock<T>& b, int64_t a0, int64_t a1);
  void (*lifted_clean_grad)(const LiftedMixBlock<T>& b, T* s, int64_t i0, int64_t i1);
};

// The level METRIX_OPS_SIMD names; unset or auto, AVX-512 where the CPU has it, else AVX2
// (lse_mix_simd.cpp); fp64 scalar.
const LseMixKernels<float>& lse_mix_kernels_f32();
const LseMixKernels<double>& lse_mix_kernels_f64();
template <typename T>
const LseMixKernels<T>& lse_mix_kernels();
template <>
inline const LseMixKernels<float>& lse_mix_kernels<float>() { return lse_mix_kernels_f32(); }
template <>
inline const LseMixKernels<double>& lse_mix_kernels<double>() { return lse_mix_kernels_f64(); }

#define MO_INLINE inline __attribute__((always_inline))
#define MO_LAMBDA_INLINE __attribute__((always_inline))

// A loss's exponents per lane: at(p, v) → LseMixTerms<F>.
template <typename T, int W>
struct CircleLanes {
  using P = CircleConsts<T>;
  // no fixed shifts: γ = 80 spans e^{±300} over s̃ ∈ [−1, 1] (two passes, LseMixKernel::fold)
  static MO_INLINE bool shifts(const P&, T&, T&) { return false; }
  template <class F>
  static MO_INLINE LseMixTerms<F> at(const P& c, F v) { return circle_mix_terms<F, T>(v, c); }
};

template <typename T, int W>
struct LiftedLanes {
  using P = LiftedMixParams<T>;
  // The exponents' largest values over the metric's range for a true cosine s̃ ∈ [−1, 1]
  // (d ∈ [0, 2], or s̃ itself): every such candidate's e^{x − shift} lies in [e^{−2}, 1], so
  // one pass of sums needs no maxima (LseMixKernel::fold)
  static MO_INLINE bool shifts(const P& p, T& pos, T& neg) {
    pos = p.cosine ? p.pos_margin + T(1) : T(2) - p.pos_margin;
    neg = p.cosine ? T(1) - p.neg_margin : p.neg_margin;
    return true;
  }
  // L2: d from 2 − 2s̃, and coincident (d = 0, no slope) below `far_from` (lifted_metrix.h)
  template <class F>
  static MO_INLINE LseMixTerms<F> at_far_from(const P& p, F v, T far_from) {
    const F zero = v * T(0);
    if (p.cosine) return lifted_mix_terms<F, T>(v, zero + T(1), true, p.pos_margin, p.neg_margin);
    const F q = con_mix_sq_dist<F, T>(v);
    F d, inv;
    ConMixRowKernel<T, W>::sqrt_lanes(q, d, inv);
    const auto far = q >= far_from;
    return lifted_mix_terms<F, T>(far ? d : zero, far ? inv : zero, false, p.pos_margin,
                                  p.neg_margin);
  }
  template <class F>
  static MO_INLINE LseMixTerms<F> at(const P& p, F v) {
    return at_far_from(p, v, con_mix_coincident_below<T>());
  }
};

// The clean pairs' exponents of GeneralizedLifted (LseClean): LiftedLanes' on a pair's own s,
// with the clean ops' rule at coincident rows (common/contrastive.h unit_l2_from_sim: d = 0
// unless 2 − 2s > 8 eps, i.e. ≥ the next value above 8 eps), not the candidates' 16 eps.
template <typename T, int W>
struct LiftedCleanLanes {
  using P = LiftedMixParams<T>;
  template <class F>
  static MO_INLINE LseMixTerms<F> at(const P& p, F v) {
    // 8 eps is a power of two, so the next value above it is exactly 8 eps (1 + eps)
    constexpr T eps = std::numeric_limits<T>::epsilon();
    return LiftedLanes<T, W>::at_far_from(p, v, T(8) * eps * (T(1) + eps));
  }
};

// Terms: the candidates' exponents; CleanTerms: the clean pairs' (LseClean), the same
// functions but for GeneralizedLifted's coincidence rule.
template <typename T, int W, template <typename, int> class Terms,
          template <typename, int> class CleanTerms = Terms>
struct LseMixKernel {
  using M = MixLanes<T, W>;
  using L = typename M::L;
  using F = typename M::F;
  using I = typename M::I;
  using R = typename M::R;
  using P = typename Terms<T, W>::P;
  using B = LseMixBlock<T, P>;

  // e^x of the candidates' exponents as 2^{x·log2 e} (MixLanes::exp2_mix: a multiply and 12
  // operations, against fast_exp's ~20 with its range picks), two per candidate. Clamped into
  // [2^−126, 2^127], never 0 or inf: the fold's sums are of e^{x − max} ≤ 1 (one pass: of
  // terms ≥ e^{−2}, checked), and the weights' exponents are ≤ ~0, so a clamped term changes
  // a sum or a weight by at most 2e-38. fp64: std::exp.
  static MO_INLINE F exp_c(F x) {
    if constexpr (W == 1) return L::exp(x);
    else return M::exp2_mix(x * T(kLog2eD));
  }

  // Folds anchors [a0, a1)'s candidates in this block into pos[a], neg[a]: the maxima of
  // each side's exponents, then the sums of e^{x − max} (exact log-sum-exps at any γ). A
  // loss whose exponents have fixed shifts (Terms::shifts: GeneralizedLifted) takes one pass
  // of Σ e^{x − shift} instead, as MS's kernels do; an anchor whose sums come out 0, too
  // large or NaN (a candidate far outside [−1, 1], from a mix of near-antipodal points whose
  // norm is clamped) is redone with the two passes.
  static MO_INLINE void fold(const B& b, int64_t a0, int64_t a1, OnlineLse<T>* pos,
                             OnlineLse<T>* neg) {
    const T inf = std::numeric_limits<T>::infinity();
    const F zero{};
    T shp = inf, shn = inf;
    const bool one_pass = Terms<T, W>::shifts(b.p, shp, shn);
    for (int64_t a = a0; a < a1; ++a) {
      if (one_pass) {
        F sp{}, sn{};
        I any{};
        M::for_candidates(b, a, [&](F v, auto ok) MO_LAMBDA_INLINE {
          const LseMixTerms<F> t = Terms<T, W>::at(b.p, v);
          sp += ok ? exp_c(t.pos - shp) : zero;
          sn += ok ? exp_c(t.neg - shn) : zero;
          any |= ok;
        });
        if (!M::any_lane(any)) continue;  // no negative in these columns
        const T tp = M::sum(sp), tn = M::sum(sn);
        // in-range terms are ≥ e^{−2} and ≤ 1 each: far from 1e-30 (out-of-range ones are
        // clamped to 2^−126, not 0) and from 1e30 (a clamped 2^127 is above it)
        if (tp > T(1e-30) && tp < T(1e30) && tn > T(1e-30) && tn < T(1e30)) {
          pos[a].merge(OnlineLse<T>{shp, tp});
          neg[a].merge(OnlineLse<T>{shn, tn});
          continue;
        }
      }
      const F ninf = zero - inf;
      F hp = ninf, hn = ninf;
      I any{};
      M::for_candidates(b, a, [&](F v, auto ok) MO_LAMBDA_INLINE {
        const LseMixTerms<F> t = Terms<T, W>::at(b.p, v);
        // the maxima over the candidate lanes, NaN exponents skipped (lane_max gives its
        // second operand on NaN); no combined masks (fast_exp.h lane_pick)
        hp = lane_max(lane_pick(ok, t.pos, ninf), hp);
        hn = lane_max(lane_pick(ok, t.neg, ninf), hn);
        any |= ok;
      });
      if (!M::any_lane(any)) continue;  // no negative in these columns
      auto max = [](T x, T y) { return y > x ? y : x; };
      const T mp = R::reduce(hp, max), mn = R::reduce(hn, max);
      F sp{}, sn{};
      M::for_candidates(b, a, [&](F v, auto ok) MO_LAMBDA_INLINE {
        const LseMixTerms<F> t = Terms<T, W>::at(b.p, v);
        sp += ok ? exp_c(t.pos - mp) : zero;
        sn += ok ? exp_c(t.neg - mn) : zero;
      });
      pos[a].merge(OnlineLse<T>{mp, M::sum(sp)});
      neg[a].merge(OnlineLse<T>{mn, M::sum(sn)});
    }
    if (b.clean.own) clean_fold(b, a0, a1);
  }

  // f(j, m, x⁺, x⁻, t, same) over anchor a's row of S in this tile, W columns at a time (m
  // of them real): t the pairs' exponents, x⁺ = t.pos on its clean positives (its label, not
  // its own slot) and −inf elsewhere, x⁻ = t.neg on its negatives and −inf elsewhere, same
  // the lanes of its label. The masks are applied one comparison at a time (lane_pick), the
  // padding lanes' only in the last group.
  template <template <typename, int> class Tm, class Fn>
  static MO_INLINE void for_clean_pairs(const B& b, int64_t a, Fn f) {
    const T inf = std::numeric_limits<T>::infinity();
    const F ninf = F{} - inf;
    const T* row = b.s + (a - b.r0) * b.nc;
    const int32_t la = b.row_lab[a];
    const int32_t* col = b.col_lab + b.c0;
    const int64_t own = b.clean.own[a] - b.c0;
    const int32_t n32 = static_cast<int32_t>(b.nc);
    const int32_t own32 = own >= 0 && own < b.nc ? static_cast<int32_t>(own) : -1;
    const I lanes = R::iota();
    auto group = [&](int64_t j, int64_t m, auto tail) MO_LAMBDA_INLINE {
      F v{};
      I c{};
      std::memcpy(&v, row + j, m * sizeof(T));
      std::memcpy(&c, col + j, m * sizeof(int32_t));
      const I idx = lanes + static_cast<int32_t>(j);
      const LseMixTerms<F> t = Tm<T, W>::at(b.p, v);
      const auto same = c == la;
      F xp = lane_pick(same, t.pos, ninf), xn = lane_pick(same, ninf, t.neg);
      xp = lane_pick(idx == own32, ninf, xp);
      if constexpr (decltype(tail)::value) {
        xp = lane_pick(idx < n32, xp, ninf);
        xn = lane_pick(idx < n32, xn, ninf);
      }
      f(j, m, xp, xn, t, same);
    };
    int64_t j = 0;
    for (; j + W <= b.nc; j += W) group(j, W, std::false_type{});
    if (j < b.nc) group(j, b.nc - j, std::true_type{});
  }

  // The clean pairs' two log-sum-exps, as fold's (maxima, then sums of e^{x − max})
  static MO_INLINE void clean_fold(const B& b, int64_t a0, int64_t a1) {
    const T inf = std::numeric_limits<T>::infinity();
    const F zero{};
    auto max = [](T x, T y) { return y > x ? y : x; };
    for (int64_t a = a0; a < a1; ++a) {
      F hp = zero - inf, hn = zero - inf;
      // NaN exponents skipped, as fold's
      for_clean_pairs<CleanTerms>(b, a, [&](int64_t, int64_t, F xp, F xn, const auto&, auto)
                                                MO_LAMBDA_INLINE {
        hp = lane_max(xp, hp);
        hn = lane_max(xn, hn);
      });
      const T mp = R::reduce(hp, max), mn = R::reduce(hn, max);
      // e^{−inf − m} is 0 (m > −inf: a side without pairs is not merged below)
      F sp{}, sn{};
      for_clean_pairs<CleanTerms>(b, a, [&](int64_t, int64_t, F xp, F xn, const auto&, auto)
                                                MO_LAMBDA_INLINE {
        sp += L::exp(xp - mp);
        sn += L::exp(xn - mn);
      });
      if (mp > -inf) b.clean.pos[a].merge(OnlineLse<T>{mp, M::sum(sp)});
      if (mn > -inf) b.clean.neg[a].merge(OnlineLse<T>{mn, M::sum(sn)});
    }
  }

  // Their entries of ∂L/∂S added into the tile's gradient rows: each side's softmax weight
  // times its upstream gradient and the exponent's slope (Weights' rule, on plain pairs)
  static MO_INLINE void clean_grad(const B& b, int64_t a0, int64_t a1) {
    const F zero{};
    for (int64_t a = a0; a < a1; ++a) {
      const T gp = b.clean.g_pos[a], gn = b.clean.g_neg[a];
      if (gp == T(0) && gn == T(0)) continue;
      const T tp = b.clean.lse_pos[a], tn = b.clean.lse_neg[a];
      T* g = b.gm + (a - b.r0) * b.nc;
      for_clean_pairs<CleanTerms>(b, a, [&](int64_t j, int64_t m, F xp, F xn,
                                            const LseMixTerms<F>& t, auto same) MO_LAMBDA_INLINE {
        // the lane's side picked before the exp; lanes of neither side have x = −inf, so
        // e^{x − lse} = 0 (a side with a pair has a finite lse)
        const F x_l = lane_pick(same, xp - tp, xn - tn);
        F w = L::exp(x_l) * lane_pick(same, gp * t.dpos, gn * t.dneg);
        w = lane_pick(x_l == x_l, w, zero);  // −inf − (−inf): no pair on either side
        F x{};
        std::memcpy(&x, g + j, m * sizeof(T));
        x += w;
        std::memcpy(g + j, &x, m * sizeof(T));
      });
    }
  }

  // The clean H = G_IJ + G_JIᵀ of rows [i0, i1) of a block of S = X Xᵀ, in place (b: its
  // geometry, rows r0.., columns c0..; b.clean: the per-anchor upstream gradients and
  // finished lses): entry (i, j) is pair (i, j)'s share of both its anchors' losses, each
  // its side's softmax weight times the exponent's slope (the self pair: 0). The block
  // walk's backward (metrix_blocks.h) then adds the mixed H and takes the products.
  static MO_INLINE void clean_sym_grad(const B& b, T* s, int64_t i0, int64_t i1) {
    const F zero{};
    const I lanes = R::iota();
    const LseClean<T>& c = b.clean;
    const int32_t* col = b.col_lab + b.c0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = b.r0 + i;
      const int32_t li = b.row_lab[gi];
      const int32_t self = gi >= b.c0 && gi < b.c0 + b.nc ? static_cast<int32_t>(gi - b.c0) : -1;
      const T gpi = c.g_pos[gi], gni = c.g_neg[gi], lpi = c.lse_pos[gi], lni = c.lse_neg[gi];
      T* row = s + i * b.nc;
      for (int64_t j = 0; j < b.nc; j += W) {
        const int64_t m = b.nc - j < W ? b.nc - j : W;
        F v{}, gpj{}, gnj{}, lpj{}, lnj{};
        I cl{};
        std::memcpy(&v, row + j, m * sizeof(T));
        std::memcpy(&cl, col + j, m * sizeof(int32_t));
        std::memcpy(&gpj, c.g_pos + b.c0 + j, m * sizeof(T));
        std::memcpy(&gnj, c.g_neg + b.c0 + j, m * sizeof(T));
        std::memcpy(&lpj, c.lse_pos + b.c0 + j, m * sizeof(T));
        std::memcpy(&lnj, c.lse_neg + b.c0 + j, m * sizeof(T));
        const I idx = lanes + static_cast<int32_t>(j);
        const LseMixTerms<F> t = CleanTerms<T, W>::at(b.p, v);
        // each lane's side picked before the exps: two per entry, not four
        const auto same = cl == li;
        const F xi = same ? t.pos - lpi : t.neg - lni, xj = same ? t.pos - lpj : t.neg - lnj;
        const F gi = same ? zero + gpi : zero + gni, gj = same ? gpj : gnj;
        const F w = (gi * L::exp(xi) + gj * L::exp(xj)) * (same ? t.dpos : t.dneg);
        // the self pair is no pair; the padding lanes are not stored
        const F out = lane_pick(idx == self, zero, w);
        std::memcpy(row + j, &out, m * sizeof(T));
      }
    }
  }

  // w = ∂L/∂s̃ = g⁺·e^{pos − lse⁺}·∂pos/∂s̃ + g⁻·e^{neg − lse⁻}·∂neg/∂s̃ (each side's softmax
  // weight; both exponents are ≤ ~0 since lse⁺, lse⁻ hold every term)
  struct Weights {
    const B& b;
    MO_INLINE bool active(int64_t a) const { return b.g_pos[a] != T(0) || b.g_neg[a] != T(0); }
    MO_INLINE auto at(int64_t a) const {
      const T gp = b.g_pos[a], gn = b.g_neg[a], tp = b.lse_pos[a], tn = b.lse_neg[a];
      const P& p = b.p;
      return [gp, gn, tp, tn, &p](F v) MO_LAMBDA_INLINE {
        const LseMixTerms<F> t = Terms<T, W>::at(p, v);
        return gp * exp_c(t.pos - tp) * t.dpos + gn * exp_c(t.neg - tn) * t.dneg;
      };
    }
  };

  // Adds anchors [a0, a1)'s terms of ∂L/∂S into gm and gw (MixLanes::grad)
  static MO_INLINE void grad(const B& b, int64_t a0, int64_t a1) {
    M::grad(b, a0, a1, Weights{b});
    if (b.clean.own) clean_grad(b, a0, a1);
  }
};

#undef MO_INLINE
#undef MO_LAMBDA_INLINE

}  // namespace metrix_ops
