// Lane types for the proxy Metrix kernels: one loop body written once (a generic lambda
// taking a lane tag) runs W floats at a time with fast_exp for fp32 and one element at a
// time otherwise (fp64 with std::exp, fp32 tails with scalar fast_exp). W = 4: SSE2's
// native width, which the baseline build has everywhere (as proxy_anchor_cpu.cpp); W = 8 and
// 16 inside functions compiled for AVX2 and AVX-512 (proxy_anchor_metrix_cpu.cpp), where the
// loop bodies must be inlined (MO_PM_INLINE, MO_PM_LAMBDA) to be compiled for that target.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/fast_exp.h"
#include "cpu/ms_kernels.h"

namespace metrix_ops {
namespace pm {

#define MO_PM_INLINE inline __attribute__((always_inline))
// the target of the 16-float row kernels (the fp32 kernels' AVX-512 level, ms_simd.cpp's)
#define MO_PM_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define MO_PM_LAMBDA __attribute__((always_inline))

template <typename T, int W>
struct Lane;

// W floats at a time (4: SSE2, the baseline; 8: AVX2, inside functions compiled for it,
// where all of this is inlined)
template <int W>
struct FloatLanes {
  static constexpr int w = W;
  using V = typename Lanes<W>::F;
  using M = typename Lanes<W>::I;  // −1 / 0 per lane
  static MO_PM_INLINE V load(const float* p) { V v; std::memcpy(&v, p, sizeof(v)); return v; }
  static MO_PM_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static MO_PM_INLINE V splat(float x) { return V{} + x; }
  static MO_PM_INLINE M eq(const int32_t* y, int32_t c) { M v; std::memcpy(&v, y, sizeof(v)); return v == (M{} + c); }
  static MO_PM_INLINE M ne(const int32_t* y, int32_t c) { M v; std::memcpy(&v, y, sizeof(v)); return v != (M{} + c); }
  // lanes j..j+W−1 other than index a
  static MO_PM_INLINE M not_index(int64_t j, int64_t a) {
    M iota{};
    for (int k = 0; k < W; ++k) iota[k] = k;
    return (iota + int32_t(j - a)) != 0;
  }
  static MO_PM_INLINE V sel(M m, V a, V b) { return m ? a : b; }
  static MO_PM_INLINE bool any(M m) {
    int32_t o = 0;
    for (int k = 0; k < W; ++k) o |= m[k];
    return o != 0;
  }
  static MO_PM_INLINE V exp(V v) { return fast_exp<V, M>(v); }
  static MO_PM_INLINE float hsum(V v) {
    if constexpr (W == 4) {
      return (v[0] + v[1]) + (v[2] + v[3]);
    } else {
      float t = 0;
      for (int k = 0; k < W; ++k) t += v[k];
      return t;
    }
  }
  static MO_PM_INLINE float hmax(V v) {
    float m = v[0];
    for (int k = 1; k < W; ++k) m = std::max(m, float(v[k]));
    return m;
  }
};

template <>
struct Lane<float, 4> : FloatLanes<4> {};

template <typename T>
struct Lane<T, 1> {
  static constexpr int w = 1;
  using V = T;
  using M = bool;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V splat(T x) { return x; }
  static M eq(const int32_t* y, int32_t c) { return *y == c; }
  static M ne(const int32_t* y, int32_t c) { return *y != c; }
  static M not_index(int64_t j, int64_t a) { return j != a; }
  static V sel(M m, V a, V b) { return m ? a : b; }
  static bool any(M m) { return m; }
  static V exp(V v) {
    if constexpr (std::is_same_v<T, float>) return fast_exp(v);
    else return std::exp(v);
  }
  static T hsum(V v) { return v; }
  static T hmax(V v) { return v; }
};

// f(lane tag, j) over j in [0, n): W-float groups for fp32 (W = 4 unless the caller is
// compiled for a wider target), then at most one group each of 8 and 4 floats, then single
// elements. The halving tail matters for short rows: ProxyAnchor's backward walks a triangle
// (row a's partners w > a), so a row ends (W − 1)/2 elements past its last full group on
// average, and at W = 16 and B = 100 those, one exp at a time, outnumbered its full groups.
template <typename T, int W = 4, typename F>
MO_PM_INLINE void for_lanes(int64_t n, F&& f) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + W <= n; j += W) f(FloatLanes<W>{}, j);
    if constexpr (W > 8) {
      if (j + 8 <= n) f(FloatLanes<8>{}, j), j += 8;
    }
    if constexpr (W > 4) {
      if (j + 4 <= n) f(FloatLanes<4>{}, j), j += 4;
    }
  }
  for (; j < n; ++j) f(Lane<T, 1>{}, j);
}

// Running sum and max over a row's lane groups, reduced across lanes once at the end: a
// horizontal reduction per group was about a fifth of the forward's operations. W-float
// vector lanes for the fp32 groups, a scalar for the tail and for fp64. `add(L, v)` takes the
// group's lane tag (for_lanes' first argument).
template <typename T, int W>
struct RowSum {
  typename Lanes<W>::F v{};
  T s = 0;
  template <class Ln, class V>
  MO_PM_INLINE void add(Ln, V x) {
    if constexpr (Ln::w == 1) s += x;
    else if constexpr (Ln::w == W) v += x;
    else s += FloatLanes<Ln::w>::hsum(x);  // for_lanes' narrower tail groups, once a row
  }
  MO_PM_INLINE T total() const {
    if constexpr (std::is_same_v<T, float>) return FloatLanes<W>::hsum(v) + s;
    else return s;
  }
};

template <typename T, int W>
struct RowMax {
  typename Lanes<W>::F v = typename Lanes<W>::F{} - std::numeric_limits<float>::infinity();
  T s = -std::numeric_limits<T>::infinity();
  template <class Ln, class V>
  MO_PM_INLINE void add(Ln, V x) {
    if constexpr (Ln::w == 1) s = std::max(s, x);
    // x NaN keeps v, as std::max(s, NaN) keeps s
    else if constexpr (Ln::w == W) v = lane_max(x, v);
    else s = std::max(s, FloatLanes<Ln::w>::hmax(x));
  }
  MO_PM_INLINE T total() const {
    if constexpr (std::is_same_v<T, float>) return std::max(FloatLanes<W>::hmax(v), s);
    else return s;
  }
};

// Below this a log-sum-exp's sum under a fixed shift is recomputed with the row's max: fp32
// flushes exps under e^{-87.3} to 0, and a sum of at least e^{-50} puts every flushed term
// more than e^{37} below it: all B of them together stay under fp32's rounding for B below
// 10^8 (fp64: e^-600 against its e^-708, alike).
template <typename T>
constexpr T shifted_sum_floor() {
  return std::is_same_v<T, float> ? T(1.9287498479639178e-22) /* e^-50 */
                                  : T(2.6503965530043108e-261) /* e^-600 */;
}

// whether a sum of e^{arg − U} (every arg ≤ U in exact arithmetic) can stand: finite, and
// far enough above underflow
template <typename T>
MO_PM_INLINE bool shifted_sum_ok(T sum) {
  return sum >= shifted_sum_floor<T>() && sum <= std::numeric_limits<T>::max();
}

// Floats a lane group of the fp32 rows at the fp32 kernels' level (ms_kernels_f32:
// METRIX_OPS_SIMD, else the widest the CPU has): 16 under AVX-512, 8 under AVX2, 4 in the
// baseline build
inline int fp32_lanes() {
  const char* level = ms_kernels_f32().level;
  if (!std::strcmp(level, "avx512")) return 16;
  return std::strcmp(level, "baseline") != 0 ? 8 : 4;
}

}  // namespace pm
}  // namespace metrix_ops
