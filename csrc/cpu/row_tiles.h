// Row-chunk streaming of S = x rᵀ for the fused CPU losses whose per-anchor work needs the
// anchor's whole row at once (softmax-type: NT-Xent, SupCon, Circle): chunks of `chunk` rows
// of x against all of r in one reused tile (chunk × M), never B×M.
//
// The backward recomputes each tile and turns it into the tile of G = ∂L/∂S in place, then
// dx_c = G_c r and, when the references need a gradient, dr += G_cᵀ x_c.
//
// Each row function also gets a scratch row of M entries (one per parallel task), where it
// gathers the arguments of its exponentials so that exp_row takes them all at once: the
// SIMD exp of the MS kernels for fp32 (≤ 2 ulp; below FLT_MIN flushed to 0), std::exp for fp64.
#pragma once

#include <algorithm>
#include <limits>
#include <utility>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "cpu/ms_blocks.h"  // ms_label_ids, ms_kernels<T>().exp, op checks

namespace metrix_ops {

// The labels of a row-chunk op as int32 ids (ms_label_ids: the same equalities, compared 4..16
// at once). Pair (i, j) is positive when the labels match and j is not skip(i); negative when
// they differ: PML's masks, whose self pair (references are the batch) is in neither set.
struct PairLabels {
  const int32_t* row;
  const int32_t* col;
  bool exclude_diag;
  int64_t M;

  // the one column of row i that is no pair (its excluded self pair), or −1. With other labels
  // at column i it is a negative, as PML (its negatives are the label mismatches).
  int64_t skip(int64_t i) const { return exclude_diag && i < M && col[i] == row[i] ? i : -1; }
};

// the label ids (ms_label_ids) and self-pair rule of an op's call
inline PairLabels pair_labels(const std::pair<at::Tensor, at::Tensor>& ids, bool exclude_diag,
                              int64_t M) {
  return {ids.first.data_ptr<int32_t>(), ids.second.data_ptr<int32_t>(), exclude_diag, M};
}

template <typename T>
inline constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// `#pragma omp simd ...` where a #pragma cannot go (inside AT_DISPATCH's lambda, a macro
// argument): the loop may be vectorised, reductions reassociated
#define MO_SIMD _Pragma("omp simd")

// v ← e^v elementwise (−inf → 0)
template <typename T>
inline void exp_row(T* v, int64_t n) { ms_kernels<T>().exp(v, v, n); }

// Calls row_fn(row of S (M entries, writable), global row i, scratch (M entries)) for every
// anchor, the rows of a tile in parallel.
template <typename T, typename RowFn>
void for_each_sim_row(const at::Tensor& x, const at::Tensor& r, int64_t chunk,
                      const RowFn& row_fn) {
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor buf = at::empty({std::min(chunk, B), M}, x.options());  // one tile, reused
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t len = std::min(chunk, B - start);
    at::Tensor st = buf.narrow(0, 0, len);  // a row prefix: contiguous
    at::mm_out(st, x.narrow(0, start, len), r.t());
    T* s = st.data_ptr<T>();
    at::parallel_for(0, len, row_grain(M), [&](int64_t r0, int64_t r1) {
      std::vector<T> scratch(M);
      for (int64_t k = r0; k < r1; ++k) row_fn(s + k * M, start + k, scratch.data());
    });
  }
}

// The backward: grad_fn(row, i, scratch) rewrites row i of S as row i of G; returns (dx, dr),
// dr zero unless need_dr.
template <typename T, typename GradFn>
std::tuple<at::Tensor, at::Tensor> sim_rows_backward(const at::Tensor& x, const at::Tensor& r,
                                                     int64_t chunk, bool need_dr,
                                                     const GradFn& grad_fn) {
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  at::Tensor buf = at::empty({std::min(chunk, B), M}, x.options());
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t len = std::min(chunk, B - start);
    at::Tensor xc = x.narrow(0, start, len);
    at::Tensor st = buf.narrow(0, 0, len);
    at::mm_out(st, xc, r.t());  // becomes G in place
    T* s = st.data_ptr<T>();
    at::parallel_for(0, len, row_grain(M), [&](int64_t r0, int64_t r1) {
      std::vector<T> scratch(M);
      for (int64_t k = r0; k < r1; ++k) grad_fn(s + k * M, start + k, scratch.data());
    });
    at::Tensor dxc = dx.narrow(0, start, len);
    at::mm_out(dxc, st, r);
    if (need_dr) dr.addmm_(st.t(), xc);
  }
  return {dx, dr};
}

}  // namespace metrix_ops
