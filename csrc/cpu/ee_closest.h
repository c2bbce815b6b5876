// The inner loops of the Embedding Expansion sweeps (ee_losses_cpu.cpp): for one anchor i and
// a tile of negative points q, the hard-negative-pair similarity
//
//     ŝ(i, q) = max_{a ∈ A_i} s(a, q),   s(a, q) = (λ_a H[a_u, q] + μ_a H[a_w, q]) / (‖a‖‖q‖),
//
// and the winning a (the earliest on ties), where a = 0 is x_i itself (s = H[i, q] / ‖q‖)
// and then come the n points of each of i's segments. A segment's points belong to both of
// its anchors' sides, so the sweep takes it in two steps: each segment's best point over the
// tile once (EeClosestKernel), then per anchor the best of x_i and of its segments' bests
// (EeCombineKernel). These are the EE losses' main cost (B·|A_i|·P evaluations of s), so
// they are written over lane types and compiled per x86 level (ee_simd.cpp), as the MS
// kernels are: lanes run over q, the loops over points inside, so best/arg stay in
// registers.
//
// Rounding is the reference's (reference/expansion_points.py): two products, a sum, then a
// division by the product of the norms; no FMA contraction (ee_simd.cpp turns it off), so
// exact ties (duplicate rows, a segment's points on x_i) fall as they do there.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "common/fast_exp.h"  // first: its -Wpsabi note covers expansion.h's lanes too
#include "common/expansion.h"  // EeArc, ee_arcs_below_lanes

namespace metrix_ops {

// A set of points (a segment's n), structure of arrays: the H rows of each point's
// endpoints, its weights and its norm.
template <typename T>
struct EeSideRows {
  const T* const* hu;
  const T* const* hw;
  const T* lam;
  const T* mu;
  const T* norm;
  int64_t count;
};

// The best of the points over the nt columns into best (−inf: none; NaN never wins), the
// first winning point (as T, exact for any count in use; −1: none) into arg; qn: the
// columns' norms.
template <typename T>
using EeClosestFn = void (*)(const EeSideRows<T>& side, const T* qn, int64_t nt, T* best,
                             T* arg);

// The kernel of the level in use (METRIX_OPS_SIMD, as ms_kernels_f32; ee_simd.cpp).
EeClosestFn<float> ee_closest_f32();
EeClosestFn<double> ee_closest_f64();
template <typename T>
EeClosestFn<T> ee_closest();
template <>
inline EeClosestFn<float> ee_closest<float>() { return ee_closest_f32(); }
template <>
inline EeClosestFn<double> ee_closest<double>() { return ee_closest_f64(); }

// The body, forced inline into the per-level entry points. W = 1: plain scalars of T;
// W > 1: GCC vectors of W floats.
template <typename T, int W>
struct EeClosestKernel {
  static inline __attribute__((always_inline)) void run(const EeSideRows<T>& sd, const T* qn,
                                                        int64_t nt, T* best, T* arg) {
    int64_t c = 0;
    const T ninf = -std::numeric_limits<T>::infinity();
    if constexpr (W > 1) {
      using F = typename Lanes<W>::F;
      for (; c + W <= nt; c += W) {
        F q;
        std::memcpy(&q, qn + c, sizeof(F));
        F b = F{} + ninf, g = F{} - 1.0f;
        for (int64_t a = 0; a < sd.count; ++a) {
          F hu, hw;
          std::memcpy(&hu, sd.hu[a] + c, sizeof(F));
          std::memcpy(&hw, sd.hw[a] + c, sizeof(F));
          const F s = (sd.lam[a] * hu + sd.mu[a] * hw) / (sd.norm[a] * q);
          const auto win = s > b;  // strict: the earliest point keeps a tie
          b = win ? s : b;
          g = win ? F{} + float(a) : g;
        }
        std::memcpy(best + c, &b, sizeof(F));
        std::memcpy(arg + c, &g, sizeof(F));
      }
    }
    for (; c < nt; ++c) {  // the tail (all of it for W = 1), the same arithmetic per lane
      T b = ninf, g = T(-1);
      for (int64_t a = 0; a < sd.count; ++a) {
        const T s = (sd.lam[a] * sd.hu[a][c] + sd.mu[a] * sd.hw[a][c]) / (sd.norm[a] * qn[c]);
        const bool win = s > b;
        b = win ? s : b;
        g = win ? T(a) : g;
      }
      best[c] = b, arg[c] = g;
    }
  }
};

// ŝ(i, q) and the winning a of A_i from x_i's row h0 and the best points of its segments
// (EeClosestKernel): segment t of A_i has values m[t], their point k[t] (−1: none) and its
// points' first index in A_i base[t] (1 + t·n), in A_i's order. The first segment holding
// the maximum wins, and in it the first point: the earliest a of A_i, as one scan over A_i
// in that order would pick, from the same roundings.
template <typename T>
struct EeSegBest {
  const T* const* m;
  const T* const* k;
  const T* base;
  int64_t count;
};

template <typename T>
using EeCombineFn = void (*)(const T* h0, const EeSegBest<T>& sb, const T* qn, int64_t nt,
                             T* best, T* arg);

EeCombineFn<float> ee_combine_f32();
EeCombineFn<double> ee_combine_f64();
template <typename T>
EeCombineFn<T> ee_combine();
template <>
inline EeCombineFn<float> ee_combine<float>() { return ee_combine_f32(); }
template <>
inline EeCombineFn<double> ee_combine<double>() { return ee_combine_f64(); }

template <typename T, int W>
struct EeCombineKernel {
  static inline __attribute__((always_inline)) void run(const T* h0, const EeSegBest<T>& sb,
                                                        const T* qn, int64_t nt, T* best,
                                                        T* arg) {
    int64_t c = 0;
    if constexpr (W > 1) {
      using F = typename Lanes<W>::F;
      for (; c + W <= nt; c += W) {
        F q, h;
        std::memcpy(&q, qn + c, sizeof(F));
        std::memcpy(&h, h0 + c, sizeof(F));
        F b = h / q, g = F{};
        for (int64_t t = 0; t < sb.count; ++t) {
          F m, k;
          std::memcpy(&m, sb.m[t] + c, sizeof(F));
          std::memcpy(&k, sb.k[t] + c, sizeof(F));
          const auto win = m > b;  // strict: the earlier segment keeps a tie
          b = win ? m : b;
          g = win ? k + sb.base[t] : g;
        }
        std::memcpy(best + c, &b, sizeof(F));
        std::memcpy(arg + c, &g, sizeof(F));
      }
    }
    for (; c < nt; ++c) {
      T b = h0[c] / qn[c], g = T(0);
      for (int64_t t = 0; t < sb.count; ++t) {
        const bool win = sb.m[t][c] > b;
        b = win ? sb.m[t][c] : b;
        g = win ? sb.k[t][c] + sb.base[t] : g;
      }
      best[c] = b, arg[c] = g;
    }
  }
};

// The marks of the HPHN mining's synthetic anchor-side points (ee_mining_cpu.cpp,
// segment_best_above), also compiled per level: for the n points of one segment with
// coefficients (a[k], b[k]) and the segment's endpoint rows Ui, Uj, the slots s < B where
// max_k (a[k]·Ui[s] + b[k]·Uj[s]) · km[s] ≥ fm, written in increasing order to `marked`;
// returns their count. The max over k is exact and each cosine rounds as ee_mix_sim (no
// FMA), so a slot is marked exactly when one of the points would mark it on its own.
template <typename T>
using EeSegMarksFn = int64_t (*)(const T* a, const T* b, int64_t n, const T* Ui, const T* Uj,
                                 const T* km, T fm, int64_t B, int64_t* marked);

EeSegMarksFn<float> ee_seg_marks_f32();
EeSegMarksFn<double> ee_seg_marks_f64();
template <typename T>
EeSegMarksFn<T> ee_seg_marks();
template <>
inline EeSegMarksFn<float> ee_seg_marks<float>() { return ee_seg_marks_f32(); }
template <>
inline EeSegMarksFn<double> ee_seg_marks<double>() { return ee_seg_marks_f64(); }

template <typename T, int W>
struct EeSegMarksKernel {
  static inline __attribute__((always_inline)) int64_t run(const T* a, const T* b, int64_t n,
                                                           const T* Ui, const T* Uj,
                                                           const T* km, T fm, int64_t B,
                                                           int64_t* marked) {
    int64_t s = 0, count = 0;
    if constexpr (W > 1) {
      using F = typename Lanes<W>::F;
      using I = typename Lanes<W>::I;
      for (; s + W <= B; s += W) {
        F x, y, k;
        std::memcpy(&x, Ui + s, sizeof(F));
        std::memcpy(&y, Uj + s, sizeof(F));
        std::memcpy(&k, km + s, sizeof(F));
        F mx = F{} - __builtin_inff();
        for (int64_t t = 0; t < n; ++t) {
          const F v = a[t] * x + b[t] * y;
          mx = v > mx ? v : mx;  // NaN never wins, as a point's own mark ignores it
        }
        const I hit = mx * k >= fm;
        // the set lanes in increasing order, one step each (a vector has few)
        for (uint32_t m = lane_bits<W>(hit); m; m &= m - 1) marked[count++] = s + __builtin_ctz(m);
      }
    }
    for (; s < B; ++s) {  // the tail (all of it for W = 1), the same arithmetic per lane
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const T v = a[t] * Ui[s] + b[t] * Uj[s];
        mx = v > mx ? v : mx;
      }
      if (mx * km[s] >= fm) marked[count++] = s;
    }
    return count;
  }
};

// The HPHN mining's pair-of-arcs filter (ee_mining_cpu.cpp, segment_best_above): keeps, in
// order, the candidate segments f of cand[0..nc) that ee_arcs_below(e, arc[f], Ui[pu[f]],
// Ui[pw[f]], Uj[pu[f]], Uj[pw[f]], lo) does not rule out, and returns their count. W/2
// candidates per vector of doubles (gathered lane by lane), the same lane arithmetic as the
// scalar test (ee_arcs_below_lanes), so every level keeps the same candidates.
template <typename T>
using EeArcsFilterFn = int64_t (*)(const EeArc<T>& e, const EeArc<T>* arc, const T* Ui,
                                   const T* Uj, const int64_t* pu, const int64_t* pw, T lo,
                                   int64_t* cand, int64_t nc);

EeArcsFilterFn<float> ee_arcs_filter_f32();
EeArcsFilterFn<double> ee_arcs_filter_f64();
template <typename T>
EeArcsFilterFn<T> ee_arcs_filter();
template <>
inline EeArcsFilterFn<float> ee_arcs_filter<float>() { return ee_arcs_filter_f32(); }
template <>
inline EeArcsFilterFn<double> ee_arcs_filter<double>() { return ee_arcs_filter_f64(); }

template <int V>
struct DoubleLanes {
  typedef double D __attribute__((vector_size(8 * V)));
};

template <typename T, int W>
struct EeArcsFilterKernel {
  static inline __attribute__((always_inline)) int64_t run(const EeArc<T>& e,
                                                           const EeArc<T>* arc, const T* Ui,
                                                           const T* Uj, const int64_t* pu,
                                                           const int64_t* pw, T lo,
                                                           int64_t* cand, int64_t nc) {
    const double sl = ee_arcs_slack<T>();
    int64_t np = 0, t = 0;
    if constexpr (W >= 4) {
      constexpr int V = W / 2;
      using D = typename DoubleLanes<V>::D;
      const D pe = D{} + double(e.p), qe = D{} + double(e.q), re = D{} + double(e.r);
      const D best = D{} + double(lo);
      for (; t + V <= nc; t += V) {
        D pf, qf, rf, ik, il, jk, jl;
        int64_t f[V];
        for (int l = 0; l < V; ++l) {
          f[l] = cand[t + l];
          const EeArc<T>& a = arc[f[l]];
          pf[l] = a.p, qf[l] = a.q, rf[l] = a.r;
          ik[l] = Ui[pu[f[l]]], il[l] = Ui[pw[f[l]]], jk[l] = Uj[pu[f[l]]], jl[l] = Uj[pw[f[l]]];
        }
        const auto skip = ee_arcs_below_lanes<D>(pe, qe, re, pf, qf, rf, ik, il, jk, jl, best, sl);
        for (int l = 0; l < V; ++l) {
          cand[np] = f[l];
          np += skip[l] == 0;
        }
      }
    }
    for (; t < nc; ++t) {
      const int64_t f = cand[t];
      cand[np] = f;
      np += !ee_arcs_below(e, arc[f], Ui[pu[f]], Ui[pw[f]], Uj[pu[f]], Uj[pw[f]], lo);
    }
    return np;
  }
};

// The largest of u[0..count) into *mx (kept where larger already) and whether any entry is
// NaN into *nan (or-ed): the HPHN mining's floor of an original anchor, its best original
// negative (ee_mining_cpu.cpp). The max is exact (NaN never wins), so every level agrees.
template <typename T>
using EeRowMaxFn = void (*)(const T* u, int64_t count, T* mx, int* nan);

EeRowMaxFn<float> ee_row_max_f32();
EeRowMaxFn<double> ee_row_max_f64();
template <typename T>
EeRowMaxFn<T> ee_row_max();
template <>
inline EeRowMaxFn<float> ee_row_max<float>() { return ee_row_max_f32(); }
template <>
inline EeRowMaxFn<double> ee_row_max<double>() { return ee_row_max_f64(); }

template <typename T, int W>
struct EeRowMaxKernel {
  static inline __attribute__((always_inline)) void run(const T* u, int64_t count, T* mx,
                                                        int* nan) {
    int64_t s = 0;
    T m = *mx;
    int bad = 0;
    if constexpr (W > 1) {
      using F = typename Lanes<W>::F;
      using I = typename Lanes<W>::I;
      F vm = F{} + m;
      I vb = I{};
      for (; s + W <= count; s += W) {
        F v;
        std::memcpy(&v, u + s, sizeof(F));
        vm = v > vm ? v : vm;
        vb |= v != v;
      }
      for (int l = 0; l < W; ++l) {
        m = vm[l] > m ? vm[l] : m;
        bad |= vb[l];
      }
    }
    for (; s < count; ++s) {
      m = u[s] > m ? u[s] : m;
      bad |= u[s] != u[s];
    }
    *mx = m;
    *nan |= bad;
  }
};

}  // namespace metrix_ops
