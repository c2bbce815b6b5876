// The row and block loops the proxy Metrix ops share: the Gram matrix H = X Xᵀ of the batch,
// streamed `chunk` rows at a time through one reused buffer (peak extra memory chunk × B,
// never B×B), or as blocks of row pairs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace metrix_ops {

// Calls block(start, len, g) for each block of `chunk` Gram rows, g = H[start : start+len, :]
// (a len × B row-major tensor, one buffer reused; the callback may overwrite it). With dx,
// the callback leaves in g the strict upper triangle U of a symmetric ∂L/∂H (zero on and
// below the diagonal: each unordered pair once, in the block of its smaller index), and the
// block goes back as dx[block] += U_blk x and dx += U_blkᵀ x[block].
template <class BlockFn>
void for_gram_blocks(const at::Tensor& x, int64_t chunk, at::Tensor* dx, BlockFn block) {
  const int64_t B = x.size(0);
  at::Tensor buf = at::empty({std::min(chunk, std::max<int64_t>(B, 1)), B}, x.options());
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t len = std::min(chunk, B - start);
    at::Tensor gb = buf.narrow(0, 0, len);  // a row prefix: contiguous
    const at::Tensor xb = x.narrow(0, start, len);
    at::mm_out(gb, xb, x.t());
    block(start, len, gb);
    if (dx != nullptr) {
      dx->narrow(0, start, len).addmm_(gb, x);
      dx->addmm_(gb.t(), xb);
    }
  }
}

// Calls row(a, h, scratch) for every row a of H in parallel, a block of `chunk` rows at a
// time: h points to H's row a (the callback may overwrite it), scratch to a per-thread
// buffer of `scratch_len` values. With `dx`, each block's rows are then multiplied back:
// dx[block] += H_block x (the callback having turned H into ∂L/∂H in place).
template <typename T, class RowFn>
void for_gram_rows(const at::Tensor& x, int64_t chunk, int64_t scratch_len, at::Tensor* dx,
                   RowFn row) {
  const int64_t B = x.size(0);
  for_gram_blocks(x, chunk, nullptr, [&](int64_t start, int64_t len, at::Tensor& gb) {
    T* g = gb.data_ptr<T>();
    at::parallel_for(start, start + len, 1, [&](int64_t a0, int64_t a1) {
      std::vector<T> scratch(scratch_len);
      for (int64_t a = a0; a < a1; ++a) row(a, g + (a - start) * B, scratch.data());
    });
    if (dx != nullptr) dx->narrow(0, start, len).addmm_(gb, x);
  });
}

// Rows per block of for_pair_blocks: two blocks a thread at least, so that a round has a
// pair of blocks for every thread; at most `chunk` rows, so that the threads' Gram blocks
// together stay within the ops' chunk × B.
inline int64_t pair_block_rows(int64_t B, int64_t chunk) {
  const int64_t two_per_thread = 2 * int64_t(at::get_num_threads());
  return std::max<int64_t>(1, std::min((B + two_per_thread - 1) / two_per_thread, chunk));
}

// Every unordered pair of blocks of `bs` rows, and each block with itself, as tasks: a task
// gets the Gram block H = x_I x_Jᵀ and calls block(a0, a1, b0, b1, H) (I = rows [a0, a1),
// J = [b0, b1)). With dx, the callback leaves in H ∂L/∂G of its pairs (on a block with
// itself, only above the diagonal), which goes back as dx_I += H x_J, dx_J += Hᵀ x_I.
// Scheduled as a round-robin tournament (the circle method: n blocks, one a bye when odd,
// n − 1 rounds of n/2 disjoint pairs, then a round of the n blocks alone), the tasks of a
// round in parallel: a row's outputs have one writer a round, and their order is fixed by
// bs, never by the threads' timing.
template <class BlockFn>
void for_pair_blocks(const at::Tensor& x, int64_t bs, at::Tensor* dx, BlockFn block) {
  const int64_t B = x.size(0);
  if (B == 0) return;
  const int64_t nb = (B + bs - 1) / bs, n = nb + (nb & 1);
  auto task = [&](int64_t I, int64_t J) {
    const int64_t a0 = I * bs, a1 = std::min(B, a0 + bs);
    const int64_t b0 = J * bs, b1 = std::min(B, b0 + bs);
    const at::Tensor xi = x.narrow(0, a0, a1 - a0), xj = x.narrow(0, b0, b1 - b0);
    at::Tensor h = at::mm(xi, xj.t());
    block(a0, a1, b0, b1, h);
    if (dx != nullptr) {
      dx->narrow(0, a0, a1 - a0).addmm_(h, xj);
      dx->narrow(0, b0, b1 - b0).addmm_(h.t(), xi);
    }
  };
  // round r: block n − 1 meets r, and (r + i) mod (n − 1) meets (r − i) mod (n − 1)
  for (int64_t r = 0; r + 1 < n; ++r) {
    at::parallel_for(0, n / 2, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t I = i == 0 ? r : (r + i) % (n - 1);
        const int64_t J = i == 0 ? n - 1 : (r - i + n - 1) % (n - 1);
        if (I < nb && J < nb) task(std::min(I, J), std::max(I, J));
      }
    });
  }
  at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) task(i, i);
  });
}

}  // namespace metrix_ops
