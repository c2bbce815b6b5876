// Per-block work of the fused multi-similarity ops on the CPU, shared by the general op
// (anchors against references) and the batch-against-itself op: folding a block of S into
// the rows' streaming log-sum-exps, and turning a block of S into the block of G = ∂L/∂S.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "common/lse_acc.h"

namespace metrix_ops {

// The labels of a block's rows and columns, and whether global row i == global column j is
// the self pair (references are the batch), which is in neither set.
struct BlockLabels {
  const int64_t* row;  // indexed by global row
  const int64_t* col;  // indexed by global column
  bool exclude_diag;
};

// Folds block s (nr×nc; global rows r0.., cols c0..) into the rows' log(1 + Σ e^·) states.
template <typename T>
void ms_fold_block(const T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0, BlockLabels lab,
                   T a, T bt, T bs, OnlineLse<T>* pos, OnlineLse<T>* neg) {
  at::parallel_for(0, nr, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = r0 + i, li = lab.row[gi];
      const T* row = s + i * nc;
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t gj = c0 + j;
        if (lab.exclude_diag && gj == gi) continue;
        if (lab.col[gj] == li) pos[gi].push(ms_pos_arg(row[j], a, bs));
        else neg[gi].push(ms_neg_arg(row[j], bt, bs));
      }
    }
  });
}

// Turns block s into g_i ∂(row loss i)/∂s_ij in place, from the rows' log-sum-exps.
template <typename T>
void ms_grad_block(T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0, BlockLabels lab,
                   const T* g, const T* lp, const T* ln, T a, T bt, T bs) {
  at::parallel_for(0, nr, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = r0 + i, li = lab.row[gi];
      T* row = s + i * nc;
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t gj = c0 + j;
        const T v = row[j];
        if (lab.exclude_diag && gj == gi) row[j] = T(0);
        else if (lab.col[gj] == li) row[j] = g[gi] * ms_pos_grad(v, a, bs, lp[gi]);
        else row[j] = g[gi] * ms_neg_grad(v, bt, bs, ln[gi]);
      }
    }
  });
}

// Per-anchor loss terms from the finished states: (1/α) lse⁺ + (1/β) lse⁻ (0 for a row with
// no pair, as PML's masked log-sum-exp); also keeps the lse's for the backward.
template <typename T>
void ms_finish_rows(const std::vector<OnlineLse<T>>& pos, const std::vector<OnlineLse<T>>& neg,
                    T a, T bt, at::Tensor& rows, at::Tensor& lse_pos, at::Tensor& lse_neg) {
  T* out = rows.data_ptr<T>();
  T* lp = lse_pos.data_ptr<T>();
  T* ln = lse_neg.data_ptr<T>();
  for (size_t i = 0; i < pos.size(); ++i) {
    lp[i] = pos[i].value();
    ln[i] = neg[i].value();
    out[i] = lp[i] / a + ln[i] / bt;
  }
}

inline void ms_check_inputs(const at::Tensor& x, const at::Tensor& labels, const char* xname,
                            const char* lname) {
  TORCH_CHECK(x.dim() == 2, xname, " must be 2-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, xname,
              " must be float32 or float64 (half inputs are upcast before the op)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) &&
                  labels.scalar_type() == at::kLong,
              lname, " must be int64 of shape (", x.size(0), ",)");
}

}  // namespace metrix_ops
