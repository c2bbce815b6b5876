// Lane types for the proxy Metrix kernels: one loop body written once (a generic lambda
// taking a lane tag) runs 4 floats at a time with fast_exp for fp32 and one element at a
// time otherwise (fp64 with std::exp, fp32 tails with scalar fast_exp). 4 floats: SSE2's
// native width, which the baseline build has everywhere (as proxy_anchor_cpu.cpp).
#pragma once

#include <cmath>
#include <cstring>
#include <type_traits>

#include "common/fast_exp.h"

namespace metrix_ops {
namespace pm {

template <typename T, int W>
struct Lane;

template <>
struct Lane<float, 4> {
  static constexpr int w = 4;
  using V = Lanes<4>::F;
  using M = Lanes<4>::I;  // −1 / 0 per lane
  static V load(const float* p) { V v; std::memcpy(&v, p, sizeof(v)); return v; }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static V splat(float x) { return V{} + x; }
  static M eq(const int32_t* y, int32_t c) { M v; std::memcpy(&v, y, sizeof(v)); return v == (M{} + c); }
  static M ne(const int32_t* y, int32_t c) { M v; std::memcpy(&v, y, sizeof(v)); return v != (M{} + c); }
  // lanes j..j+3 other than index a
  static M not_index(int64_t j, int64_t a) {
    const M iota = {0, 1, 2, 3};
    return (iota + int32_t(j - a)) != 0;
  }
  static V sel(M m, V a, V b) { return m ? a : b; }
  static bool any(M m) { return (m[0] | m[1] | m[2] | m[3]) != 0; }
  static V exp(V v) { return fast_exp<V, M>(v); }
  static float hsum(V v) { return (v[0] + v[1]) + (v[2] + v[3]); }
  static float hmax(V v) { return std::max(std::max(v[0], v[1]), std::max(v[2], v[3])); }
};

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

// f(lane tag, j) over j in [0, n): 4-float groups for fp32, then single elements
template <typename T, typename F>
inline void for_lanes(int64_t n, F&& f) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>)
    for (; j + 4 <= n; j += 4) f(Lane<float, 4>{}, j);
  for (; j < n; ++j) f(Lane<T, 1>{}, j);
}

}  // namespace pm
}  // namespace metrix_ops
