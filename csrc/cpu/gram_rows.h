// The row loop the proxy Metrix ops share: the Gram matrix H = X Xᵀ of the batch, streamed
// `chunk` rows at a time through one reused buffer (peak extra memory chunk × B, never B×B).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace metrix_ops {

// Calls row(a, h, scratch) for every row a of H in parallel: h points to H's row a (the
// callback may overwrite it), scratch to a per-thread buffer of `scratch_len` values. With
// `dx`, each chunk's rows are then multiplied back: dx[chunk] += H_chunk x (the callback
// having turned H into ∂L/∂H in place).
template <typename T, class RowFn>
void for_gram_rows(const at::Tensor& x, int64_t chunk, int64_t scratch_len, at::Tensor* dx,
                   RowFn row) {
  const int64_t B = x.size(0);
  at::Tensor buf = at::empty({std::min(chunk, std::max<int64_t>(B, 1)), B}, x.options());
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t len = std::min(chunk, B - start);
    at::Tensor gb = buf.narrow(0, 0, len);  // a row prefix: contiguous
    at::mm_out(gb, x.narrow(0, start, len), x.t());
    T* g = gb.data_ptr<T>();
    at::parallel_for(start, start + len, 1, [&](int64_t a0, int64_t a1) {
      std::vector<T> scratch(scratch_len);
      for (int64_t a = a0; a < a1; ++a) row(a, g + (a - start) * B, scratch.data());
    });
    if (dx != nullptr) dx->narrow(0, start, len).addmm_(gb, x);
  }
}

// Calls block(start, len, g) for each block of `chunk` Gram rows, g = H[start : start+len, :]
// (len × B, row-major; the callback may overwrite it). With dx, the callback leaves in g the
// strict upper triangle U of a symmetric ∂L/∂H (zero on and below the diagonal: each
// unordered pair once, in the block of its smaller index), and the block goes back as
// dx[block] += U_blk x and dx += U_blkᵀ x[block].
template <typename T, class BlockFn>
void for_gram_blocks(const at::Tensor& x, int64_t chunk, at::Tensor* dx, BlockFn block) {
  const int64_t B = x.size(0);
  at::Tensor buf = at::empty({std::min(chunk, std::max<int64_t>(B, 1)), B}, x.options());
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t len = std::min(chunk, B - start);
    at::Tensor gb = buf.narrow(0, 0, len);
    const at::Tensor xb = x.narrow(0, start, len);
    at::mm_out(gb, xb, x.t());
    block(start, len, gb.data_ptr<T>());
    if (dx != nullptr) {
      dx->narrow(0, start, len).addmm_(gb, x);
      dx->addmm_(gb.t(), xb);
    }
  }
}

}  // namespace metrix_ops
