// NT-Xent (InfoNCE) and SupCon per-element math (PML's NTXentLoss and SupConLoss with
// cosine similarity s and logits z = s/τ), shared by host and device code.
//
// Both are softmax cross-entropies over an anchor's row. Where PML's arithmetic decides
// whether a term is exactly zero — which AvgNonZero counts — it is followed: NT-Xent shifts
// each positive pair by max(z_p, max of the negatives) and adds the dtype's `tiny` inside the
// log; SupCon takes its log-softmax of z − (row max over every column).
#pragma once

#include <cmath>
#include <limits>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

template <typename T>
MO_HD T ntx_logit(T s, T temperature) { return s / temperature; }

// ---------------------------------------------------------------- NT-Xent

// The probability q of a positive pair of logit z against itself and its anchor's negatives,
// given the negatives' (max m, Σ e^{z_n − m}), and 1 − q computed on its own (no cancellation
// when q ≈ 1). PML's shift max(z, m): num = e^{z − shift}, den = Σ_n e^{z_n − shift} + num.
// An anchor without negatives has m = −inf and sum 0: q = 1.
template <typename T>
struct NtxProb {
  T q, rest;
};

template <typename T>
MO_HD NtxProb<T> ntx_prob(T z, T neg_max, T neg_sum) {
  NtxProb<T> p;
  if (!(z < neg_max)) {  // num = 1
    const T e = neg_sum * std::exp(neg_max - z);
    p.q = T(1) / (T(1) + e);
    p.rest = e / (T(1) + e);
  } else {
    const T num = std::exp(z - neg_max);
    p.q = num / (neg_sum + num);
    p.rest = neg_sum / (neg_sum + num);
  }
  return p;
}

// The pair's loss −log(q + tiny), tiny the smallest normal number (PML's guard of log 0)
template <typename T>
MO_HD T ntx_loss(NtxProb<T> p) { return -std::log(p.q + std::numeric_limits<T>::min()); }

// w = −∂(pair loss)/∂z_p = q(1 − q)/(q + tiny). The same pair gives each negative n of its
// anchor ∂/∂z_n = w · e^{z_n − m}/Σ_n e^{z_n − m}: the weights of an anchor's kept pairs add.
template <typename T>
MO_HD T ntx_pos_weight(NtxProb<T> p) {
  return p.q * p.rest / (p.q + std::numeric_limits<T>::min());
}

// ---------------------------------------------------------------- SupCon

// The anchor's loss from PML's shifted quantities (u = z − row max): lse of u over its pairs,
// and Σ_P u over its n_pos positives: −(Σ_P u − n_pos·lse)/n_pos, so that one positive gives
// exactly PML's −(u_p − lse); 0 without positives (PML's 0/(0 + tiny)).
template <typename T>
MO_HD T supcon_loss(T lse_shifted, T pos_sum_shifted, T n_pos) {
  return n_pos > T(0) ? -(pos_sum_shifted - n_pos * lse_shifted) / n_pos : T(0);
}

// ∂(anchor loss)/∂z_j = softmax_j − [j positive]/n_pos, softmax_j = e^{z_j − lse} over the
// anchor's pairs (the caller takes the exponentials, e.g. a row at a time); all 0 without
// positives
template <typename T>
MO_HD T supcon_grad(T softmax, bool pos, T inv_n_pos) {
  return softmax - (pos ? inv_n_pos : T(0));
}

}  // namespace metrix_ops
