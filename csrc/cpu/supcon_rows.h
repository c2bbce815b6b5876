// SupConLoss's work on a piece of one anchor's row of S (columns c0..c0+nc; `skip`: its
// excluded self pair there, −1: none): the batch-against-itself op folds pieces into the
// anchor's state (supcon_self_cpu.cpp), and both ops turn a piece into its piece of G
// (the general op a whole row, ntxent_cpu.cpp). z = s/τ; the anchor's pairs are every column
// but the self pair; its positives those with its label.
#pragma once

#include <algorithm>

#include "common/ntxent.h"
#include "common/row_state.h"
#include "cpu/row_tiles.h"

namespace metrix_ops {

// the anchor's state over its pairs: log Σ e^z online, and Σ z and the count over positives
template <typename T>
struct SupConState {
  OnlineLse<T> lse = OnlineLse<T>::empty();
  T pos_sum = T(0), n_pos = T(0);
};

template <typename T>
void supcon_fold_piece(const T* s, int64_t nc, int32_t yi, const int32_t* col, int64_t skip,
                       T t, T* u, SupConState<T>& st) {
  const T ninf = kNegInf<T>;
  T m = ninf;
  _Pragma("omp simd reduction(max : m)")
  for (int64_t j = 0; j < nc; ++j) {
    const T v = j != skip ? ntx_logit(s[j], t) : ninf;
    m = v > m ? v : m;
  }
  if (m == ninf) return;  // no pair here (the self pair alone)
  T pos_sum = T(0), n_pos = T(0);
  _Pragma("omp simd reduction(+ : pos_sum, n_pos)")
  for (int64_t j = 0; j < nc; ++j) {
    const T z = ntx_logit(s[j], t);
    u[j] = j != skip ? z - m : ninf;
    const bool pos = col[j] == yi && j != skip;
    pos_sum += pos ? z : T(0);
    n_pos += pos ? T(1) : T(0);
  }
  exp_row(u, nc);
  T sum = T(0);
  _Pragma("omp simd reduction(+ : sum)")
  for (int64_t j = 0; j < nc; ++j) sum += u[j];
  st.lse.merge(OnlineLse<T>{m, sum});
  st.pos_sum += pos_sum;
  st.n_pos += n_pos;
}

// s becomes g ∂(anchor loss)/∂s: (g/τ)(softmax over the pairs − [positive]/n_pos), 0 at the
// self pair and everywhere for an anchor without positives; L: the anchor's log Σ e^z
template <typename T>
void supcon_grad_piece(T* s, int64_t nc, int32_t yi, const int32_t* col, int64_t skip, T t,
                       T g, T L, int64_t n_pos, T* u) {
  if (n_pos == 0) {  // no loss, no gradient
    std::fill(s, s + nc, T(0));
    return;
  }
  const T gi = g / t, inv_n = T(1) / T(n_pos), ninf = kNegInf<T>;
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j)  // the softmax over the pairs
    u[j] = j != skip ? ntx_logit(s[j], t) - L : ninf;
  exp_row(u, nc);
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j) s[j] = gi * supcon_grad(u[j], col[j] == yi && j != skip, inv_n);
}

}  // namespace metrix_ops
