// Multi-similarity per-pair math, shared by host and
// device code (the CPU build tests exactly what the CUDA kernels compute).
#pragma once

#include <cmath>
#include <limits>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

// log(1 + Σ e^{v}): the streaming log-sum-exp of row_state.h started from the e^0 term, the
// form of MS, lifted-structure and proxy-anchor terms.
template <typename T>
MO_HD OnlineLse<T> lse_with_one() {
  OnlineLse<T> a;
  a.m = T(0);
  a.s = T(1);
  return a;
}

// Multi-similarity exponents (PML's form, cosine similarity s):
//   positive pair: −α(s − base),  negative pair: β(s − base)
template <typename T>
MO_HD T ms_pos_arg(T s, T alpha, T base) { return -alpha * (s - base); }
template <typename T>
MO_HD T ms_neg_arg(T s, T beta, T base) { return beta * (s - base); }

// d(row loss)/ds for one pair, given the row's log(1 + Σ e^{arg}) of its side:
//   pos: (1/α)·d/ds log(1+Σ e^{−α(s−b)}) = −e^{arg − lse};  neg: +e^{arg − lse}
template <typename T>
MO_HD T ms_pos_grad(T s, T alpha, T base, T lse) { return -std::exp(ms_pos_arg(s, alpha, base) - lse); }
template <typename T>
MO_HD T ms_neg_grad(T s, T beta, T base, T lse) { return std::exp(ms_neg_arg(s, beta, base) - lse); }

// PML's MultiSimilarityMiner: row i keeps a positive pair when s − ε < hn_i (its hardest
// negative) and a negative pair when s + ε > hp_i (its hardest positive), compared in T; a
// NaN keeps nothing. (The CPU kernels, cpu/ms_kernels.h, take the same comparisons in lanes.)
template <typename T>
MO_HD bool ms_miner_keeps(T s, bool pos, T hn, T hp, T eps) {
  return pos ? (s - eps < hn) : (s + eps > hp);
}

}  // namespace metrix_ops
