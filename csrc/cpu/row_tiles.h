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
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "cpu/ms_kernels.h"  // ms_kernels<T>().exp
#include "cpu/op_checks.h"

namespace metrix_ops {

// Label tests of pair (i, j), as PML's masks: positive when the labels match (not the self
// pair j == i when the references are the batch), negative when they differ.
struct PairLabels {
  const int64_t* row;
  const int64_t* col;
  bool exclude_diag;

  bool pos(int64_t i, int64_t j) const { return row[i] == col[j] && !(exclude_diag && i == j); }
  bool neg(int64_t i, int64_t j) const { return row[i] != col[j]; }
};

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
