// CircleLoss's work on a piece of one anchor's row of S (a whole row for the general op,
// circle_cpu.cpp; a block's share of it for the batch against itself, circle_self_cpu.cpp):
// folding it into the anchor's two log-sum-exps, and turning it into its piece of G.
//
// Fold: the logits into a scratch row with each side's max, then one SIMD exp pass
// (exp_row), then the two sums, merged into the anchor's states. Gradient: each entry of G
// is one exponential, g · softplus'(lse⁺ + lse⁻) · softmax within its side · ∓weight.
// Column j is a positive when its label is the anchor's and j is not `skip` (the excluded
// self pair, −1: none), a negative when the labels differ.
#pragma once

#include <algorithm>

#include "common/circle.h"
#include "common/row_state.h"
#include "cpu/row_tiles.h"

namespace metrix_ops {

template <typename T>
void circle_fold_piece(const T* s, int64_t nc, int32_t yi, const int32_t* col, int64_t skip,
                       const CircleConsts<T>& c, T* u, OnlineLse<T>& pos, OnlineLse<T>& neg) {
  const T ninf = kNegInf<T>;
  T mp = ninf, mn = ninf;  // each side's max logit
  _Pragma("omp simd reduction(max : mp, mn)")
  for (int64_t j = 0; j < nc; ++j) {
    const bool p = col[j] == yi && j != skip, n = col[j] != yi;
    const T l = p ? circle_pos_logit(s[j], c) : (n ? circle_neg_logit(s[j], c) : ninf);
    u[j] = l;
    mp = p && l > mp ? l : mp;
    mn = n && l > mn ? l : mn;
  }
  if (mp == ninf && mn == ninf) return;
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j) u[j] -= col[j] == yi ? (j != skip ? mp : T(0)) : mn;
  exp_row(u, nc);
  T sp = T(0), sn = T(0);
  _Pragma("omp simd reduction(+ : sp, sn)")
  for (int64_t j = 0; j < nc; ++j) {  // the self pair's 0 may land in sp
    sp += col[j] == yi ? u[j] : T(0);
    sn += col[j] != yi ? u[j] : T(0);
  }
  if (mp > ninf) pos.merge(OnlineLse<T>{mp, sp});
  if (mn > ninf) neg.merge(OnlineLse<T>{mn, sn});
}

// s (the piece of S) becomes the piece of G; g: the anchor's upstream gradient, lpi, lni its
// finished log-sum-exps
template <typename T>
void circle_grad_piece(T* s, int64_t nc, int32_t yi, const int32_t* col, int64_t skip,
                       const CircleConsts<T>& c, T g, T lpi, T lni, T* u) {
  const T ninf = kNegInf<T>;
  if (lpi == ninf || lni == ninf) {  // a side is empty: the anchor's loss is 0
    std::fill(s, s + nc, T(0));
    return;
  }
  const T gs = g * softplus20_grad(lpi + lni);
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j) {  // softmax within the side × ∓weight
    const T v = s[j];
    const bool p = col[j] == yi && j != skip, n = col[j] != yi;
    u[j] = p ? circle_pos_logit(v, c) - lpi : (n ? circle_neg_logit(v, c) - lni : ninf);
    s[j] = p ? -gs * circle_pos_weight(v, c) : (n ? gs * circle_neg_weight(v, c) : T(0));
  }
  exp_row(u, nc);
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j) s[j] *= u[j];
}

// the anchor's loss from its two log-sum-exps: softplus(lse⁺ + lse⁻), 0 when a side is empty
template <typename T>
T circle_row_loss(T lpi, T lni) {
  return lpi > kNegInf<T> && lni > kNegInf<T> ? softplus20(lpi + lni) : T(0);
}

}  // namespace metrix_ops
