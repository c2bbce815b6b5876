// Per-row streaming statistics of a similarity row: online log-sum-exp and max/argmax.
// Written once for host and device: the CPU build tests exactly the math CUDA runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MO_HD __host__ __device__ __forceinline__
#else
#define MO_HD inline
#endif

namespace metrix_ops {

template <typename T>
struct RowState {
  T m;        // running max used as the log-sum-exp shift (== best, kept apart for clarity)
  T s;        // sum of exp(v - m) over the values seen
  T best;     // max value seen
  int64_t arg;  // index of the first occurrence of `best` (lowest index wins ties)

  MO_HD static RowState empty() {
    RowState r;
    r.m = -std::numeric_limits<T>::infinity();
    r.s = T(0);
    r.best = -std::numeric_limits<T>::infinity();
    r.arg = -1;
    return r;
  }

  // Values must arrive in increasing index order for the tie rule to hold.
  MO_HD void push(T v, int64_t j) {
    if (v > best) {
      best = v;
      arg = j;
    }
    if (v == -std::numeric_limits<T>::infinity()) return;  // exp(-inf) adds nothing
    if (v > m) {
      s = s * exp(m - v) + T(1);
      m = v;
    } else {
      s += exp(v - m);
    }
  }

  // Merges a state over other indices; ties go to the lower index whichever side holds it.
  MO_HD void merge(const RowState& o) {
    if (o.best > best || (o.best == best && o.arg >= 0 && (arg < 0 || o.arg < arg))) {
      best = o.best;
      arg = o.arg;
    }
    if (o.s == T(0)) return;
    if (s == T(0)) {
      m = o.m;
      s = o.s;
      return;
    }
    if (o.m > m) {
      s = s * exp(m - o.m) + o.s;
      m = o.m;
    } else {
      s += o.s * exp(o.m - m);
    }
  }

  MO_HD T lse() const {
    return s > T(0) ? m + log(s) : -std::numeric_limits<T>::infinity();
  }
};

}  // namespace metrix_ops
