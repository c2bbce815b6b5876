// Argument checks of the fused CPU loss ops, one copy for all of them. CPU-only (nvcc never
// includes it), so inline definitions here carry none of common/checks.h's ODR risk.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace metrix_ops {

inline void check_labels_of(const at::Tensor& labels, int64_t n, const char* lname) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong,
              lname, " must be int64 of shape (", n, ",)");
}

// rows x (2-D fp32/fp64: the Python side upcasts half inputs) and their labels
inline void check_rows_labels(const at::Tensor& x, const at::Tensor& labels, const char* xname,
                              const char* lname) {
  TORCH_CHECK(x.dim() == 2, xname, " must be 2-D (rows, D), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, xname,
              " must be float32 or float64 (half inputs are upcast before the op), got ",
              x.scalar_type());
  check_labels_of(labels, x.size(0), lname);
}

// anchors x against references r, streamed in chunks of r
inline void check_pair_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                              const at::Tensor& ref_labels, int64_t chunk) {
  check_rows_labels(x, labels, "x", "labels");
  check_rows_labels(r, ref_labels, "r", "ref_labels");
  TORCH_CHECK(x.size(1) == r.size(1), "x and r must have the same D, got ", x.size(1), " and ",
              r.size(1));
  TORCH_CHECK(x.scalar_type() == r.scalar_type(), "x and r must have the same dtype");
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
}

// examples x against class proxies p (the labels index the proxies)
inline void check_proxy_inputs(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                               int64_t chunk) {
  check_rows_labels(x, labels, "x", "labels");
  TORCH_CHECK(p.dim() == 2, "proxies must be 2-D (num_classes, D), got ", p.dim(), "-D");
  TORCH_CHECK(p.size(1) == x.size(1), "x and proxies must have the same D, got ", x.size(1),
              " and ", p.size(1));
  TORCH_CHECK(p.scalar_type() == x.scalar_type(), "x and proxies must have the same dtype, got ",
              x.scalar_type(), " and ", p.scalar_type());
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
  if (labels.numel()) {
    const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < p.size(0), "labels must be in [0, num_classes=", p.size(0),
                "), got values in [", lo, ", ", hi, "]");
  }
}

// Embedding Expansion segments (seg_i[e], seg_j[e]): positive pairs of distinct rows in
// [0, B). Checked whatever n_points is, so that n_points = 0 rejects a batch the other n do
// ("adjacent" pairs of different labels, which under torch.compile only the op can see).
inline void check_segments(const int64_t* lab, int64_t B, const at::Tensor& seg_i,
                           const at::Tensor& seg_j) {
  const int64_t* pi = seg_i.data_ptr<int64_t>();
  const int64_t* pj = seg_j.data_ptr<int64_t>();
  for (int64_t e = 0; e < seg_i.size(0); ++e) {
    const int64_t i = pi[e], j = pj[e];
    TORCH_CHECK(i >= 0 && i < B && j >= 0 && j < B && i != j, "seg_i/seg_j: segment ", e,
                " = (", i, ", ", j, ") must join two distinct rows in [0, ", B, ")");
    TORCH_CHECK(lab[i] == lab[j], "seg_i/seg_j: segment ", e, " = (", i, ", ", j,
                ") joins rows of different labels; segments are positive pairs");
  }
}

// The arguments every Embedding Expansion op takes: rows, labels, segments, n and chunk.
inline void check_ee_rows_segments(const at::Tensor& x, const at::Tensor& labels,
                                   const at::Tensor& seg_i, const at::Tensor& seg_j, int64_t n,
                                   int64_t chunk) {
  check_rows_labels(x, labels, "x", "labels");
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
  TORCH_CHECK(n >= 0, "n_points must be >= 0, got ", n);
  TORCH_CHECK(seg_i.dim() == 1 && seg_j.dim() == 1 && seg_i.size(0) == seg_j.size(0) &&
                  seg_i.scalar_type() == at::kLong && seg_j.scalar_type() == at::kLong,
              "seg_i and seg_j must be int64 of the same shape (S,)");
}

// a vector of one value per row / proxy, as the backward ops take
inline void check_vec(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be of shape (", n, ",)");
}

// A backward op's per-anchor inputs (row gradients, saved row statistics), each checked to be
// one value per row of x and returned contiguous in x's dtype, in the order given
inline std::vector<at::Tensor> row_vectors(
    const at::Tensor& x, std::initializer_list<std::pair<const at::Tensor*, const char*>> vs) {
  std::vector<at::Tensor> out;
  for (const auto& v : vs) {
    check_vec(*v.first, x.size(0), v.second);
    out.push_back(v.first->to(x.scalar_type()).contiguous());
  }
  return out;
}

// rows of a tile per parallel task: about 32k entries, whole rows of length n
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// the batch against itself, in square blocks
inline void check_self_inputs(const at::Tensor& x, const at::Tensor& labels, int64_t block) {
  check_rows_labels(x, labels, "x", "labels");
  TORCH_CHECK(block > 0, "block must be > 0, got ", block);
}

}  // namespace metrix_ops
