// Online log-sum-exp accumulator and multi-similarity per-pair math, shared by host and
// device code (the CPU build tests exactly what the CUDA kernels compute).
#pragma once

#include <cmath>
#include <limits>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

// log(Σ e^{v}) over pushed values; `with_one` starts the sum at e^0 = 1 (log(1 + Σ ...)).
template <typename T>
struct LseAcc {
  T m, s;
  MO_HD static LseAcc start(bool with_one) {
    LseAcc a;
    a.m = with_one ? T(0) : -std::numeric_limits<T>::infinity();
    a.s = with_one ? T(1) : T(0);
    return a;
  }
  MO_HD void push(T v) {
    if (v > m) {
      s = s * exp(m - v) + T(1);
      m = v;
    } else {
      s += exp(v - m);
    }
  }
  MO_HD void merge(const LseAcc& o) {
    if (o.s == T(0)) return;
    if (s == T(0)) { m = o.m; s = o.s; return; }
    if (o.m > m) { s = s * exp(m - o.m) + o.s; m = o.m; }
    else { s += o.s * exp(o.m - m); }
  }
  MO_HD T value() const { return s > T(0) ? m + log(s) : -std::numeric_limits<T>::infinity(); }
};

// Multi-similarity exponents (PML's form, cosine similarity s):
//   positive pair: −α(s − base),  negative pair: β(s − base)
template <typename T>
MO_HD T ms_pos_arg(T s, T alpha, T base) { return -alpha * (s - base); }
template <typename T>
MO_HD T ms_neg_arg(T s, T beta, T base) { return beta * (s - base); }

// d(row loss)/ds for one pair, given the row's log(1 + Σ e^{arg}) of its side:
//   pos: (1/α)·d/ds log(1+Σ e^{−α(s−b)}) = −e^{arg − lse};  neg: +e^{arg − lse}
template <typename T>
MO_HD T ms_pos_grad(T s, T alpha, T base, T lse) { return -exp(ms_pos_arg(s, alpha, base) - lse); }
template <typename T>
MO_HD T ms_neg_grad(T s, T beta, T base, T lse) { return exp(ms_neg_arg(s, beta, base) - lse); }

}  // namespace metrix_ops
