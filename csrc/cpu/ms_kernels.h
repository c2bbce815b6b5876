// The per-element passes of the fused multi-similarity ops over one block of S, written once
// over a lane width W: fp32 runs them W floats at a time with fast_exp (instantiated per ISA
// in ms_simd.cpp and picked at run time), fp64 runs them one element at a time with std::exp
// (exact to the 1e-6 the float64 contract asks).
//
// Fold: per row, one pass for the extreme similarities of each side (min s over positives,
// max s over negatives: the largest exponents), then one pass summing e^{arg − max arg}
// into that side's partial log-sum-exp, which is merged into the row's running state. Two
// passes over a row that sits in L1 beat the branchy online update, which cannot vectorise.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "common/fast_exp.h"
#include "common/lse_acc.h"

namespace metrix_ops {

// One block of S (nr×nc, rows r0.., columns c0.. of the whole matrix), what the fold and the
// gradient need to know about it. Labels are dense int32 ids (compared 16 to a vector on
// AVX-512); global row i == global column j is the self pair when exclude_diag.
template <typename T>
struct MsBlock {
  int64_t nc, r0, c0;
  const int32_t* row_lab;  // indexed by global row
  const int32_t* col_lab;  // indexed by global column
  bool exclude_diag;
  T alpha, beta, base;
  // gradient only: the row weights ∂L/∂(row loss) and the rows' finished log-sum-exps
  const T *g, *lse_pos, *lse_neg;
  // MultiSimilarityMiner inside the op (rows against references only; nullptr: every pair).
  // Row i keeps a positive when s − ε < hardest_neg[i] and a negative when
  // s + ε > hardest_pos[i], PML's comparisons as PML writes them; the fold counts the kept
  // pairs of each row into kept[2i], kept[2i + 1].
  const T* hardest_neg = nullptr;
  const T* hardest_pos = nullptr;
  T eps = T(0);
  int64_t* kept = nullptr;
  // per global row, the global column of its self pair (−1: none), for references in another
  // order than the rows (the Metrix op against references); null: exclude_diag's rule
  const int64_t* skip_col = nullptr;
};

template <typename T>
struct MixBlock;  // embedding-level Metrix over a block (ms_metrix_kernels.h)

// Kernels over the rows [i0, i1) of a block: fold s into the row states, or overwrite s
// with G = ∂L/∂S.
template <typename T>
struct MsKernels {
  void (*fold)(const T* s, int64_t i0, int64_t i1, const MsBlock<T>& b, OnlineLse<T>* pos,
               OnlineLse<T>* neg);
  void (*grad)(T* s, int64_t i0, int64_t i1, const MsBlock<T>& b);
  // The columns [j0, j1) of the block as rows of Sᵀ (the batch-against-itself op's other
  // half of an off-diagonal block), without transposing it: fold them into the columns'
  // states, or overwrite s with H = G + (G of Sᵀ)ᵀ, the row and column terms of each s_ij.
  void (*fold_cols)(const T* s, int64_t nr, int64_t j0, int64_t j1, const MsBlock<T>& b,
                    OnlineLse<T>* pos, OnlineLse<T>* neg);
  void (*grad_sym)(T* s, int64_t i0, int64_t i1, const MsBlock<T>& b);
  void (*exp)(const T* x, T* y, int64_t n);  // the elementwise exp the kernels use
  // Metrix (pos_neg) candidates of the anchors [a0, a1) (whole classes, global rows): fold
  // them into the anchors' states, or add their terms of ∂L/∂S (ms_metrix_kernels.h)
  void (*mix_fold)(const MixBlock<T>& b, int64_t a0, int64_t a1, OnlineLse<T>* pos,
                   OnlineLse<T>* neg);
  void (*mix_grad)(const MixBlock<T>& b, int64_t a0, int64_t a1);
  void (*mix_exp2)(const T* x, T* y, int64_t n);  // their clamped 2^x, elementwise (tests)
  const char* level;
};

// The fp32 kernels of the level in use: METRIX_OPS_SIMD=avx512|avx2|baseline when set (an
// error if this CPU lacks it), else the 16-lane kernels (with the 8-lane elementwise exp) where
// it has AVX-512, AVX2 where it has that (ms_simd.cpp: default_level).
const MsKernels<float>& ms_kernels_f32();
// Whether this CPU runs level "avx512", "avx2" or "baseline" (ms_simd.cpp)
bool cpu_has(const char* level);
const MsKernels<double>& ms_kernels_f64();
template <typename T>
const MsKernels<T>& ms_kernels();
template <>
inline const MsKernels<float>& ms_kernels<float>() { return ms_kernels_f32(); }
template <>
inline const MsKernels<double>& ms_kernels<double>() { return ms_kernels_f64(); }

// Everything below is forced inline into the per-ISA entry points of ms_simd.cpp, so that
// it is compiled (and vectorised) for their target, not the file's baseline.
#define MO_INLINE inline __attribute__((always_inline))
#define MO_LAMBDA_INLINE __attribute__((always_inline))

// Lane types: W = 1 is plain scalars (any T), W > 1 GCC vectors of float.
template <typename T, int W>
struct MsLanes {
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  static MO_INLINE F exp(F x) { return fast_exp<F, I>(x); }
  static MO_INLINE F exp_clamped(F x) { return fast_exp_clamped<F, I>(x); }
};
template <typename T>
struct MsLanes<T, 1> {
  using F = T;
  using I = int32_t;
  static MO_INLINE F exp(F x) { return std::exp(x); }
  static MO_INLINE F exp_clamped(F x) { return std::exp(x); }  // fp64: no clamp needed
};

template <typename T, int W>
struct MsRowKernel {
  using F = typename MsLanes<T, W>::F;
  using I = typename MsLanes<T, W>::I;

  static MO_INLINE I iota() {
    I v{};
    if constexpr (W > 1)
      for (int k = 0; k < W; ++k) v[k] = k;
    return v;
  }
  static MO_INLINE T lane(F v, int64_t k) {
    if constexpr (W == 1) return v;
    else return v[k];
  }
  template <class Op>
  static MO_INLINE int64_t reduce_int(I v, Op op) {
    if constexpr (W == 1) {
      return v;
    } else {
      int64_t r = v[0];
      for (int k = 1; k < W; ++k) r = op(r, int64_t(v[k]));
      return r;
    }
  }
  template <class Op>
  static MO_INLINE T reduce(F v, Op op) {
    if constexpr (W == 1) {
      return v;
    } else {
      T r = v[0];
      for (int k = 1; k < W; ++k) r = op(r, v[k]);
      return r;
    }
  }

  // Calls f(j, m, v, same, keep) for each group of W elements of the row: m of them real
  // (m == W, a constant, in the main loop: whole-vector loads and stores), same the lanes
  // whose column has the row's label (the positive side), keep(x, out) x where the lane's
  // pair is in and out where it is not (the self pair, the padding after the row's end and,
  // with Mine, the pairs the miner drops: hn, hp, eps are the row's hardest negative, hardest
  // positive and ε). At 16 lanes every mask is applied by its own single-comparison
  // lane_pick, never combined with another: GCC (12) lowers combined masks a lane at a time
  // in the AVX-512 code (common/fast_exp.h). Up to 8 lanes they combine into one select,
  // which stays vector code there.
  template <bool Mine, class Fn>
  static MO_INLINE void for_lanes(const T* row, int64_t n, const int32_t* col, int32_t li,
                                  int32_t skip, T hn, T hp, T eps, Fn f) {
    const I lanes = iota();
    const int32_t n32 = static_cast<int32_t>(n);
    auto group = [&](int64_t j, int64_t m, auto tail) MO_LAMBDA_INLINE {
      F v{};
      I c{};
      std::memcpy(&v, row + j, m * sizeof(T));
      std::memcpy(&c, col + j, m * sizeof(int32_t));
      const I idx = lanes + static_cast<int32_t>(j);
      const auto same = c == li;
      // PML's miner keeps a positive when s − ε < hn and a negative when s + ε > hp: one
      // comparison u < bound, with the negatives' side negated (exact, NaN still fails)
      F u{}, bound{};
      if constexpr (Mine) {
        u = lane_pick(same, v - eps, -(v + eps));
        bound = lane_pick(same, F{} + hn, F{} - hp);
      }
      auto keep = [&](F x, F out) MO_LAMBDA_INLINE {
        if constexpr (sizeof(F) < 64) {  // up to 8 lanes: combined masks stay vector code
          auto ok = idx != skip;
          if constexpr (Mine) ok = ok & (u < bound);
          if constexpr (decltype(tail)::value) ok = ok & (idx < n32);
          return F(ok ? x : out);
        } else {
          x = lane_pick(idx == skip, out, x);
          if constexpr (Mine) x = lane_pick(u < bound, x, out);
          if constexpr (decltype(tail)::value) x = lane_pick(idx < n32, x, out);
          return x;
        }
      };
      f(j, m, v, same, keep);
    };
    int64_t j = 0;
    for (; j + W <= n; j += W) group(j, W, std::false_type{});
    if (j < n) group(j, n - j, std::true_type{});
  }

  // The row's pairs' extremes: min s over its positives into lo, max s over its negatives
  // into hi (NaN skipped: lane_min/lane_max keep their second operand), and with Mine the
  // kept pairs per lane (a kept positive has s − ε < hn, so s < +inf: it is counted by
  // vp < inf; a kept negative by vn > −inf).
  template <bool Mine>
  static MO_INLINE void row_extremes(const T* row, int64_t n, const int32_t* col, int32_t li,
                                     int32_t skip, T hn, T hp, T eps, F& lo, F& hi, I& np,
                                     I& nn) {
    const T inf = std::numeric_limits<T>::infinity();
    const F pinf = F{} + inf, ninf = F{} - inf;
    for_lanes<Mine>(row, n, col, li, skip, hn, hp, eps,
                    [&](int64_t, int64_t, F v, auto same, auto keep) MO_LAMBDA_INLINE {
      const F vp = keep(lane_pick(same, v, pinf), pinf);
      const F vn = keep(lane_pick(same, ninf, v), ninf);
      lo = lane_min(vp, lo);
      hi = lane_max(vn, hi);
      if constexpr (Mine) {
        np += lane_pick(vp < inf, I{} + 1, I{});
        nn += lane_pick(vn > -inf, I{} + 1, I{});
      }
    });
  }

  template <bool Mine>
  static MO_INLINE void fold_row(const T* row, int64_t n, const int32_t* col, int32_t li, int32_t skip,
                       T a, T bt, T bs, OnlineLse<T>& pos, OnlineLse<T>& neg, T hn = T(0),
                       T hp = T(0), T eps = T(0), int64_t* kept = nullptr) {
    const T inf = std::numeric_limits<T>::infinity();
    F lo = F{} + inf, hi = F{} - inf;
    I np{}, nn{};  // kept pairs per lane (Mine)
    row_extremes<Mine>(row, n, col, li, skip, hn, hp, eps, lo, hi, np, nn);
    if constexpr (Mine) {
      auto add = [](int64_t x, int64_t y) { return x + y; };
      kept[0] += reduce_int(np, add);
      kept[1] += reduce_int(nn, add);
    }
    const T s_lo = reduce(lo, [](T x, T y) { return y < x ? y : x; });
    const T s_hi = reduce(hi, [](T x, T y) { return y > x ? y : x; });
    if (!(s_lo < inf) && !(s_hi > -inf)) return;  // no pair on either side
    // e^{arg − max arg}: −α(s − s_lo) for positives, β(s − s_hi) for negatives; the side is
    // picked before the one exp, and a lane out of the row gets −inf. Clamped exp: those
    // lanes and arguments below ln FLT_MIN add FLT_MIN (1.2e-38) instead of 0 to a sum whose
    // largest term is 1, far below its last bit, and it saves fast_exp's three range picks.
    F sp{}, sn{};
    const F zero{}, ninf = zero - inf;
    for_lanes<Mine>(row, n, col, li, skip, hn, hp, eps,
                    [&](int64_t, int64_t, F v, auto same, auto keep) MO_LAMBDA_INLINE {
      const F k = lane_pick(same, F{} - a, F{} + bt);
      const F e = MsLanes<T, W>::exp_clamped(keep(k * (v - lane_pick(same, F{} + s_lo, F{} + s_hi)), ninf));
      sp += lane_pick(same, e, zero);
      sn += lane_pick(same, zero, e);
    });
    auto add = [](T x, T y) { return x + y; };
    if (s_lo < inf) pos.merge(OnlineLse<T>{ms_pos_arg(s_lo, a, bs), reduce(sp, add)});
    if (s_hi > -inf) neg.merge(OnlineLse<T>{ms_neg_arg(s_hi, bt, bs), reduce(sn, add)});
  }

  // row[j] ← g·∂(row loss)/∂s_j: −g·e^{−α(s−base) − lse⁺} or g·e^{β(s−base) − lse⁻}; 0 for
  // the self pair. With Sym, plus the same term of column j's own loss (weights and
  // log-sum-exps of the global columns at cg, cp, cn): s_ij is also s_ji of that row.
  template <bool Sym, bool Mine>
  static MO_INLINE void grad_row(T* row, int64_t n, const int32_t* col, int32_t li,
                                 int32_t skip, T g, T lp, T ln, T a, T bt, T bs, const T* cg,
                                 const T* cp, const T* cn, T hn = T(0), T hp = T(0),
                                 T eps = T(0)) {
    const F zero{};
    for_lanes<Mine>(row, n, col, li, skip, hn, hp, eps,
                    [&](int64_t j, int64_t m, F v, auto same, auto keep) MO_LAMBDA_INLINE {
      const F t = lane_pick(same, F{} - a, F{} + bt) * (v - bs);
      F w = g * MsLanes<T, W>::exp(t - lane_pick(same, F{} + lp, F{} + ln));
      if constexpr (Sym) {
        F gc{}, lpc{}, lnc{};
        std::memcpy(&gc, cg + j, m * sizeof(T));
        std::memcpy(&lpc, cp + j, m * sizeof(T));
        std::memcpy(&lnc, cn + j, m * sizeof(T));
        w += gc * MsLanes<T, W>::exp(t - lane_pick(same, lpc, lnc));
      }
      // masked after the exps: a side without pairs has lse −inf, e^{t + inf} = inf
      w = keep(w, zero);
      const F out = lane_pick(same, zero - w, w);
      std::memcpy(row + j, &out, m * sizeof(T));
    });
  }

  // Column-wise fold of columns [j0, j1): the same two passes as fold_row, W columns at a
  // time going down the rows, with one running extreme and sum per column lane.
  static MO_INLINE void fold_cols(const T* s, int64_t nr, int64_t j0, int64_t j1,
                                  const MsBlock<T>& b, OnlineLse<T>* pos, OnlineLse<T>* neg) {
    const T inf = std::numeric_limits<T>::infinity();
    const F pinf = F{} + inf, ninf = F{} - inf, zero{};
    const T a = b.alpha, bt = b.beta, bs = b.base;
    const I lanes = iota();
    auto group = [&](int64_t j, int64_t m, auto tail) MO_LAMBDA_INLINE {
      I c{};
      std::memcpy(&c, b.col_lab + b.c0 + j, m * sizeof(int32_t));
      const I gcol = lanes + static_cast<int32_t>(b.c0 + j);
      const int32_t m32 = static_cast<int32_t>(m);
      // f(v, same, keep) down the rows, keep as for_lanes' (the self pair is the lane whose
      // global column is the row's global index)
      auto down = [&](auto f) MO_LAMBDA_INLINE {
        for (int64_t i = 0; i < nr; ++i) {
          F v{};
          if constexpr (decltype(tail)::value) std::memcpy(&v, s + i * b.nc + j, m * sizeof(T));
          else std::memcpy(&v, s + i * b.nc + j, sizeof(F));
          const int32_t gi = static_cast<int32_t>(b.r0 + i), li = b.row_lab[gi];
          const int32_t skip = b.exclude_diag ? gi : -1;
          auto keep = [&](F x, F out) MO_LAMBDA_INLINE {
            x = lane_pick(gcol == skip, out, x);
            if constexpr (decltype(tail)::value) x = lane_pick(lanes < m32, x, out);
            return x;
          };
          f(v, c == li, keep);
        }
      };
      F lo = pinf, hi = ninf;
      down([&](F v, auto same, auto keep) MO_LAMBDA_INLINE {
        lo = lane_min(keep(lane_pick(same, v, pinf), pinf), lo);
        hi = lane_max(keep(lane_pick(same, ninf, v), ninf), hi);
      });
      F sp{}, sn{};
      down([&](F v, auto same, auto keep) MO_LAMBDA_INLINE {
        const F k = lane_pick(same, F{} - a, F{} + bt);
        const F e = MsLanes<T, W>::exp_clamped(keep(k * (v - lane_pick(same, lo, hi)), ninf));
        sp += lane_pick(same, e, zero);
        sn += lane_pick(same, zero, e);
      });
      for (int64_t k = 0; k < m; ++k) {
        const T l = lane(lo, k), h = lane(hi, k);
        if (l < inf) pos[b.c0 + j + k].merge(OnlineLse<T>{ms_pos_arg(l, a, bs), lane(sp, k)});
        if (h > -inf) neg[b.c0 + j + k].merge(OnlineLse<T>{ms_neg_arg(h, bt, bs), lane(sn, k)});
      }
    };
    int64_t j = j0;
    for (; j + W <= j1; j += W) group(j, W, std::false_type{});
    if (j < j1) group(j, j1 - j, std::true_type{});
  }

  // y = exp(x): whole vectors, then one partial group (a fixed-size copy per vector; the
  // variable-length copy only once)
  static MO_INLINE void exp_array(const T* x, T* y, int64_t n) {
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      F v;
      std::memcpy(&v, x + j, sizeof(F));
      v = MsLanes<T, W>::exp(v);
      std::memcpy(y + j, &v, sizeof(F));
    }
    if (j < n) {
      F v{};
      std::memcpy(&v, x + j, (n - j) * sizeof(T));
      v = MsLanes<T, W>::exp(v);
      std::memcpy(y + j, &v, (n - j) * sizeof(T));
    }
  }

  static MO_INLINE int32_t skip_of(const MsBlock<T>& b, int64_t i) {
    if (b.skip_col) {
      const int64_t d = b.skip_col[b.r0 + i] - b.c0;  // −1 − c0 < 0: none
      return d >= 0 && d < b.nc ? static_cast<int32_t>(d) : -1;
    }
    const int64_t d = b.r0 + i - b.c0;  // local column of the self pair
    return b.exclude_diag && d >= 0 && d < b.nc ? static_cast<int32_t>(d) : -1;
  }

  static MO_INLINE void fold(const T* s, int64_t i0, int64_t i1, const MsBlock<T>& b,
                             OnlineLse<T>* pos, OnlineLse<T>* neg) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = b.r0 + i;
      if (b.hardest_neg)
        fold_row<true>(s + i * b.nc, b.nc, b.col_lab + b.c0, b.row_lab[gi], skip_of(b, i),
                       b.alpha, b.beta, b.base, pos[gi], neg[gi], b.hardest_neg[gi],
                       b.hardest_pos[gi], b.eps, b.kept + 2 * gi);
      else
        fold_row<false>(s + i * b.nc, b.nc, b.col_lab + b.c0, b.row_lab[gi], skip_of(b, i),
                        b.alpha, b.beta, b.base, pos[gi], neg[gi]);
    }
  }

  // Sym (the batch-against-itself op) has no miner: its column terms would need the
  // columns' thresholds too
  template <bool Sym>
  static MO_INLINE void grad(T* s, int64_t i0, int64_t i1, const MsBlock<T>& b) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = b.r0 + i;
      if (!Sym && b.hardest_neg)
        grad_row<false, true>(s + i * b.nc, b.nc, b.col_lab + b.c0, b.row_lab[gi],
                              skip_of(b, i), b.g[gi], b.lse_pos[gi], b.lse_neg[gi], b.alpha,
                              b.beta, b.base, nullptr, nullptr, nullptr, b.hardest_neg[gi],
                              b.hardest_pos[gi], b.eps);
      else
        grad_row<Sym, false>(s + i * b.nc, b.nc, b.col_lab + b.c0, b.row_lab[gi],
                             skip_of(b, i), b.g[gi], b.lse_pos[gi], b.lse_neg[gi], b.alpha,
                             b.beta, b.base, b.g + b.c0, b.lse_pos + b.c0, b.lse_neg + b.c0);
    }
  }
};

#undef MO_INLINE
#undef MO_LAMBDA_INLINE

}  // namespace metrix_ops
