// Pieces of the fused triplet ops shared by triplet_cpu.cpp (all triplets) and
// triplet_mined_cpu.cpp (the triplets a TripletMarginMiner keeps): argument checks, the
// row's sorted positives and the block of values the keys come from. CPU-only, so inline
// definitions carry no ODR risk (see cpu/op_checks.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/triplet.h"
#include "cpu/op_checks.h"

namespace metrix_ops {

inline void check_triplet_inputs(const at::Tensor& x, const at::Tensor& r,
                                 const at::Tensor& labels, const at::Tensor& ref_labels,
                                 bool exclude_diag, double margin, int64_t chunk) {
  check_sim_inputs(x, r, 1.0, chunk);
  check_labels_of(labels, x.size(0), "labels");
  check_labels_of(ref_labels, r.size(0), "ref_labels");
  // exclude_diag: row i skips column i, so r holds the batch first (the batch itself, or a
  // CrossBatchMemory bank rolled to start at the batch's slots)
  TORCH_CHECK(!exclude_diag || x.size(0) <= r.size(0),
              "exclude_diag needs r to start with the batch (at least as many rows as x)");
  TORCH_CHECK(std::isfinite(margin), "margin must be finite, got ", margin);
}

struct TripletCtx {
  const int64_t* labels;
  const int64_t* ref_labels;
  bool exclude_diag, cosine;
  double margin;
};

// A row's positive keys with their columns, sorted by key. Only the positives are sorted
// (typically a handful): each negative then finds its active positives, a suffix, by
// binary search, so a row costs O(M log P) and the negatives are never sorted.
template <typename T>
struct SortedPositives {
  std::vector<std::pair<T, int64_t>> kj;  // (key, column)
  std::vector<T> keys;

  void build(const T* s, int64_t m, const int64_t* col, int64_t label, int64_t self,
             bool cosine) {
    kj.clear();
    for (int64_t j = 0; j < m; ++j)
      if (j != self && col[j] == label) kj.emplace_back(tri_key(s[j], cosine), j);
    std::sort(kj.begin(), kj.end());
    keys.resize(kj.size());
    for (size_t t = 0; t < kj.size(); ++t) keys[t] = kj[t].first;
  }
  int64_t size() const { return int64_t(kj.size()); }
};

// The block of values the keys come from, rows [start, start + len). L2: distances exactly
// as PML's LpDistance computes them, torch.cdist on the unit rows with the matmul-or-direct
// choice cdist makes for the whole B×M call, so that rounding-level ties (quantised
// embeddings, margin 0) fall on the same side of the hinge as in PML. Cosine: S, as PML.
inline at::Tensor value_block(const at::Tensor& x, const at::Tensor& r, int64_t start,
                              int64_t len, bool cosine) {
  const at::Tensor xc = x.narrow(0, start, len);
  if (cosine) return at::mm(xc, r.t()).contiguous();
  const int64_t mode = (x.size(0) > 25 || r.size(0) > 25) ? 1 : 2;  // use / do not use mm
  return at::cdist(xc, r, 2.0, mode).contiguous();
}

}  // namespace metrix_ops
