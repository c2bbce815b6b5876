// NT-Xent's gradient on a piece of one anchor's row of S (columns c0..c0+nc; `skip`: its
// excluded self pair there, −1: none), shared by the general op (a whole row,
// ntxent_cpu.cpp) and the batch-against-itself op (a block's share, ntxent_self_cpu.cpp).
// A positive pair's loss is −log q, q its probability against its anchor's negatives (whose
// logit max m and Σ e^{z − m} = sum the forward kept); pairs outside the reducer's window
// (lo, hi) are not counted. G at a positive: −(g/τ) w_p, w_p = q(1 − q)/q; at a negative n:
// (g/τ) (Σ_p w_p) e^{z_n − m}/sum; 0 at the self pair.
#pragma once

#include "common/contrastive.h"  // in_window
#include "common/ntxent.h"
#include "cpu/row_tiles.h"

namespace metrix_ops {

// w_p of a positive pair of logit z, 0 outside the window
template <typename T>
T ntxent_kept_weight(T z, T m, T sum, T lo, T hi) {
  const NtxProb<T> p = ntx_prob(z, m, sum);
  return in_window(ntx_loss(p), lo, hi) ? ntx_pos_weight(p) : T(0);
}

// s becomes its piece of G; gt = g/τ, w_total = Σ_p w_p over the anchor's kept pairs
template <typename T>
void ntxent_grad_piece(T* s, int64_t nc, int32_t yi, const int32_t* col, int64_t skip, T t,
                       T gt, T m, T sum, T w_total, T lo, T hi, T* u) {
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j) u[j] = col[j] != yi ? ntx_logit(s[j], t) - m : kNegInf<T>;
  exp_row(u, nc);  // 0 at the positives and the self pair
  for (int64_t j = 0; j < nc; ++j) {  // the positives: few, one exp each
    if (col[j] != yi || j == skip) continue;
    s[j] = -gt * ntxent_kept_weight(ntx_logit(s[j], t), m, sum, lo, hi);
  }
  const T neg_scale = sum > T(0) ? gt * w_total / sum : T(0);
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j)
    s[j] = col[j] != yi ? neg_scale * u[j] : (j == skip ? T(0) : s[j]);
}

}  // namespace metrix_ops
