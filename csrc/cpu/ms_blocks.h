// Per-block work of the fused multi-similarity ops on the CPU, shared by the general op
// (anchors against references) and the batch-against-itself op: folding a block of S into
// the rows' streaming log-sum-exps, and turning a block of S into the block of G = ∂L/∂S.
#pragma once

#include <algorithm>
#include <limits>
#include <utility>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "cpu/ms_kernels.h"
#include "cpu/op_checks.h"

namespace metrix_ops {

// The labels of a block's rows and columns as dense int32 ids, and whether global row i ==
// global column j is the self pair (references are the batch), which is in neither set.
struct BlockLabels {
  const int32_t* row;  // indexed by global row
  const int32_t* col;  // indexed by global column
  bool exclude_diag;
};

// int64 labels as int32 ids with the same equalities (the kernels compare 8 or 16 int32 at
// once): a cast when they fit, else their index among the distinct values of both sets.
inline std::pair<at::Tensor, at::Tensor> ms_label_ids(const at::Tensor& labels,
                                                      const at::Tensor& ref_labels) {
  const int64_t lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();
  // a loop over the (CPU, int64) labels: two reductions and two reads cost more at small B
  auto fits = [&](const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kLong, "labels must be int64, got ", t.scalar_type());
    const at::Tensor c = t.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    return std::all_of(p, p + c.numel(), [&](int64_t v) { return v >= lo && v <= hi; });
  };
  if (fits(labels) && fits(ref_labels))
    return {labels.to(at::kInt).contiguous(), ref_labels.to(at::kInt).contiguous()};
  at::Tensor ids = std::get<1>(at::_unique(at::cat({labels, ref_labels}), true, true)).to(at::kInt);
  return {ids.narrow(0, 0, labels.size(0)).contiguous(),
          ids.narrow(0, labels.size(0), ref_labels.size(0)).contiguous()};
}

inline at::Tensor ms_label_ids(const at::Tensor& labels) {
  return ms_label_ids(labels, labels.narrow(0, 0, 0)).first;
}

// The MultiSimilarityMiner's per-row thresholds (global rows; all null: no miner) and where
// the fold counts each row's kept positive and negative pairs.
template <typename T>
struct MsMiner {
  const T* hardest_neg = nullptr;
  const T* hardest_pos = nullptr;
  T eps = T(0);
  int64_t* kept = nullptr;
};

template <typename T>
MsBlock<T> ms_block(int64_t nc, int64_t r0, int64_t c0, BlockLabels lab, T a, T bt, T bs,
                    const T* g, const T* lp, const T* ln, const MsMiner<T>& mine) {
  MsBlock<T> b{nc, r0, c0, lab.row, lab.col, lab.exclude_diag, a, bt, bs, g, lp, ln};
  b.hardest_neg = mine.hardest_neg;
  b.hardest_pos = mine.hardest_pos;
  b.eps = mine.eps;
  b.kept = mine.kept;
  return b;
}

// Folds block s (nr×nc; global rows r0.., cols c0..) into the rows' log(1 + Σ e^·) states;
// with cols, also into the columns' states (s_ij as s_ji: the other half of an
// off-diagonal block of a symmetric S).
template <typename T>
void ms_fold_block(const T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0, BlockLabels lab,
                   T a, T bt, T bs, OnlineLse<T>* pos, OnlineLse<T>* neg, bool cols = false,
                   const MsMiner<T>& mine = {}) {
  TORCH_CHECK(!(cols && mine.hardest_neg), "the miner runs on the anchors-against-references op only");
  const MsBlock<T> b = ms_block<T>(nc, r0, c0, lab, a, bt, bs, nullptr, nullptr, nullptr, mine);
  const MsKernels<T>& k = ms_kernels<T>();
  at::parallel_for(0, nr, 8, [&](int64_t i0, int64_t i1) { k.fold(s, i0, i1, b, pos, neg); });
  if (cols)  // grain of whole 64-byte lines of each row
    at::parallel_for(0, nc, 16, [&](int64_t j0, int64_t j1) {
      k.fold_cols(s, nr, j0, j1, b, pos, neg);
    });
}

// Turns block s into g_i ∂(row loss i)/∂s_ij in place, from the rows' log-sum-exps; with
// sym (the rows and columns are the same batch), plus g_j ∂(row loss j)/∂s_ji: then s is
// H = G_IJ + G_JIᵀ of the batch-against-itself op.
template <typename T>
void ms_grad_block(T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0, BlockLabels lab,
                   const T* g, const T* lp, const T* ln, T a, T bt, T bs, bool sym = false,
                   const MsMiner<T>& mine = {}) {
  TORCH_CHECK(!(sym && mine.hardest_neg), "the miner runs on the anchors-against-references op only");
  const MsBlock<T> b = ms_block<T>(nc, r0, c0, lab, a, bt, bs, g, lp, ln, mine);
  const auto grad = sym ? ms_kernels<T>().grad_sym : ms_kernels<T>().grad;
  at::parallel_for(0, nr, 8, [&](int64_t i0, int64_t i1) { grad(s, i0, i1, b); });
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

}  // namespace metrix_ops
