// The batch against itself over the blocks I <= J of the symmetric S = x xᵀ: one product per
// block pair instead of two, shared by every fused "self" op (forward and backward).
#pragma once

#include <algorithm>

#include <torch/types.h>

namespace metrix_ops {

// fn(s, r0, nr, c0, nc) for every block pair I <= J, s = x_I x_Jᵀ contiguous (the callee may
// overwrite it, e.g. with the block of G). An off-diagonal block stands for (J, I) as well.
template <class F>
void for_upper_blocks(const at::Tensor& x, int64_t block, F&& fn) {
  const int64_t B = x.size(0);
  for (int64_t r0 = 0; r0 < B; r0 += block) {
    const int64_t nr = std::min(block, B - r0);
    const at::Tensor xi = x.narrow(0, r0, nr);
    for (int64_t c0 = r0; c0 < B; c0 += block) {
      const int64_t nc = std::min(block, B - c0);
      at::Tensor s = at::mm(xi, x.narrow(0, c0, nc).t()).contiguous();
      fn(s, r0, nr, c0, nc);
    }
  }
}

// dx += the block's share of H x, H = G + Gᵀ held for block (I, J): dx_I += H_IJ x_J and, off
// the diagonal, dx_J += H_IJᵀ x_I (a diagonal H is symmetric: one product covers it).
inline void add_sym_block_grad(at::Tensor& dx, const at::Tensor& x, const at::Tensor& h,
                               int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
  dx.narrow(0, r0, nr).addmm_(h, x.narrow(0, c0, nc));
  if (c0 != r0) dx.narrow(0, c0, nc).addmm_(h.t(), x.narrow(0, r0, nr));
}

}  // namespace metrix_ops
