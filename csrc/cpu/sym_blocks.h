// The batch against itself over the blocks I <= J of the symmetric S = x xᵀ: one product per
// block pair instead of two, shared by every fused "self" op (forward and backward).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/types.h>

namespace metrix_ops {

// Rows of any norm (the L2 of unnormalised embeddings) through the ops written for unit
// rows: block s of x xᵀ (global rows r0.., columns c0..) is rewritten in place as the
// similarity unit rows at the same distance would have, s̃ = 1 − d²/2 with
// d² = ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j (torch.cdist's product form; sq: the squared norms,
// dim: D). For coincident rows d² is the difference of two sums of the same D products in
// different orders: rounding of up to ~½√D ulps of max(‖x_i‖², ‖x_j‖²) (measured: 8–12 at
// D = 128 to 512). Below 2√D ulps it is taken as 0: coincident rows get d = 0 and no
// gradient, as cdist's direct path, and real distances below ~√(2√D·ε)·‖x‖ (3e-3·‖x‖ in
// fp32 at D = 512) with them. The absolute precision of 1 − d²/2 is ε: rows of norm ≪ 1
// lose relative precision (d² ~ ε is noise).
// The same for a block of x rᵀ (anchors against references): sq_rows, sq_cols the squared
// norms of the block's rows and columns.
// The threshold's factor: d² below raw_zero_tiny · max(‖x_i‖², ‖r_j‖²) is taken as 0.
template <typename T>
T raw_zero_tiny(int64_t dim) {
  return T(2) * std::max(T(1), std::sqrt(T(dim))) * std::numeric_limits<T>::epsilon();
}

// One row of the rewrite: row i (squared norm ni) against columns of squared norms sq_cols,
// from `in` to `out` (may be the same). Selects of values, not branches: the compiler
// vectorises it (a quarter faster than the branchy form, measured).
template <typename T>
inline void raw_row_to_unit_sims(const T* in, T* out, int64_t nc, T ni, const T* sq_cols,
                                 T tiny) {
  for (int64_t j = 0; j < nc; ++j) {
    const T nj = sq_cols[j];
    const T q = (ni + nj) - T(2) * in[j];
    const T m = ni > nj ? ni : nj;
    out[j] = T(1) - T(0.5) * (q > tiny * m ? q : T(0));
  }
}

template <typename T>
void raw_to_unit_sims_of(T* s, int64_t nr, int64_t nc, const T* sq_rows, const T* sq_cols,
                         int64_t dim) {
  const T tiny = raw_zero_tiny<T>(dim);
  at::parallel_for(0, nr, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* row = s + i * nc;
      raw_row_to_unit_sims(row, row, nc, sq_rows[i], sq_cols, tiny);
    }
  });
}

template <typename T>
void raw_to_unit_sims(T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0, const T* sq,
                      int64_t dim) {
  raw_to_unit_sims_of(s, nr, nc, sq + r0, sq + c0, dim);
}

// the rows' squared norms, in x's dtype, contiguous (raw_to_unit_sims's sq)
inline at::Tensor sq_norms(const at::Tensor& x) { return x.mul(x).sum(1).contiguous(); }

// fn(s, r0, nr, c0, nc) for every block pair I <= J of the blocks [bounds[k], bounds[k+1]),
// s = x_I x_Jᵀ contiguous (the callee may overwrite it, e.g. with the block of G). An
// off-diagonal block stands for (J, I) as well.
template <class F>
void for_upper_blocks_at(const at::Tensor& x, const std::vector<int64_t>& bounds, F&& fn) {
  for (size_t bi = 0; bi + 1 < bounds.size(); ++bi) {
    const int64_t r0 = bounds[bi], nr = bounds[bi + 1] - r0;
    const at::Tensor xi = x.narrow(0, r0, nr);
    for (size_t bj = bi; bj + 1 < bounds.size(); ++bj) {
      const int64_t c0 = bounds[bj], nc = bounds[bj + 1] - c0;
      at::Tensor s = at::mm(xi, x.narrow(0, c0, nc).t()).contiguous();
      fn(s, r0, nr, c0, nc);
    }
  }
}

// the same over square blocks of `block` rows
template <class F>
void for_upper_blocks(const at::Tensor& x, int64_t block, F&& fn) {
  std::vector<int64_t> bounds;
  for (int64_t r0 = 0; r0 < x.size(0); r0 += block) bounds.push_back(r0);
  bounds.push_back(x.size(0));
  for_upper_blocks_at(x, bounds, fn);
}

// dx += the block's share of H x, H = G + Gᵀ held for block (I, J): dx_I += H_IJ x_J and, off
// the diagonal, dx_J += H_IJᵀ x_I (a diagonal H is symmetric: one product covers it).
inline void add_sym_block_grad(at::Tensor& dx, const at::Tensor& x, const at::Tensor& h,
                               int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  dx.narrow(0, r0, nr).addmm_(h, x.narrow(0, c0, nc));
  if (c0 != r0) dx.narrow(0, c0, nc).addmm_(h.t(), x.narrow(0, r0, nr));
}

// The radial part of a symmetric block's gradient for rows of any norm, where the ops read
// s̃_ij = 1 − d²_ij/2 = x_i·x_j − ‖x_i‖²/2 − ‖x_j‖²/2 + 1, whose gradient in x_i is x_j − x_i:
// add_sym_block_grad gave the x_j parts, this the −x_i ones, dx_I −= (H_IJ 1)·x_I and, off
// the diagonal, dx_J −= (H_IJᵀ 1)·x_J.
inline void add_sym_block_radial(at::Tensor& dx, const at::Tensor& x, const at::Tensor& h,
                                 int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  dx.narrow(0, r0, nr).addcmul_(h.sum(1, true), x.narrow(0, r0, nr), -1);
  if (c0 != r0) dx.narrow(0, c0, nc).addcmul_(h.sum(0).unsqueeze(1), x.narrow(0, c0, nc), -1);
}

}  // namespace metrix_ops
