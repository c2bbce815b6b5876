// Per-row streaming statistics of a similarity row: online log-sum-exp and max/argmax.
// Written once for host and device, so the CPU build tests exactly the math CUDA runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

// Host-only translation units (g++) must not see the CUDA qualifiers; `inline` keeps
// non-template helpers in headers ODR-safe when several .cpp files include them.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MO_HD __host__ __device__ __forceinline__
#else
#define MO_HD inline
#endif

namespace metrix_ops {

// std::exp / std::log pick the float overloads for T = float on the host (the unqualified
// C names resolve to the double versions there) and map to the CUDA intrinsics on device.

// log Σ e^{v} over a stream, as (running max m, Σ e^{v − m}). Every state with s == 0 is
// "empty" (m = −inf), and merges treat it as the identity, so splitting a row among any
// number of threads, some of which see no values, gives the same result.
template <typename T>
struct OnlineLse {
  T m;
  T s;

  MO_HD static OnlineLse empty() {
    OnlineLse a;
    a.m = -std::numeric_limits<T>::infinity();
    a.s = T(0);
    return a;
  }

  MO_HD void push(T v) {
    // exp(−inf − (−inf)) would be NaN; a −inf value adds nothing anyway.
    if (v == -std::numeric_limits<T>::infinity()) return;
    if (v > m) {
      s = s * std::exp(m - v) + T(1);  // rescale the old sum to the new max (0 when empty)
      m = v;
    } else {
      s += std::exp(v - m);
    }
  }

  MO_HD void merge(const OnlineLse& o) {
    if (o.s == T(0)) return;
    if (s == T(0)) {
      *this = o;
      return;
    }
    if (o.m > m) {
      s = s * std::exp(m - o.m) + o.s;
      m = o.m;
    } else {
      s += o.s * std::exp(o.m - m);
    }
  }

  MO_HD T value() const {
    return s > T(0) ? m + std::log(s) : -std::numeric_limits<T>::infinity();
  }
};

// Running max and the index of its first occurrence. `arg == -1` marks the empty state.
template <typename T>
struct MaxArg {
  T best;
  int64_t arg;

  MO_HD static MaxArg empty() {
    MaxArg a;
    a.best = -std::numeric_limits<T>::infinity();
    a.arg = -1;
    return a;
  }

  // Strict `>`: within one stream indices must arrive in increasing order, so the first
  // (lowest) index of a repeated maximum is kept.
  MO_HD void push(T v, int64_t j) {
    if (v > best || arg < 0) {
      best = v;
      arg = j;
    }
  }

  // Streams may cover interleaved index sets (strided threads), so ties are broken by index
  // explicitly instead of by order.
  MO_HD void merge(const MaxArg& o) {
    if (o.arg < 0) return;
    if (arg < 0 || o.best > best || (o.best == best && o.arg < arg)) {
      best = o.best;
      arg = o.arg;
    }
  }
};

// Both statistics of one row: what sim_row_stats returns.
template <typename T>
struct RowState {
  OnlineLse<T> lse;
  MaxArg<T> max;

  MO_HD static RowState empty() {
    RowState r;
    r.lse = OnlineLse<T>::empty();
    r.max = MaxArg<T>::empty();
    return r;
  }
  MO_HD void push(T v, int64_t j) {
    lse.push(v);
    max.push(v, j);
  }
  MO_HD void merge(const RowState& o) {
    lse.merge(o.lse);
    max.merge(o.max);
  }
};

}  // namespace metrix_ops
