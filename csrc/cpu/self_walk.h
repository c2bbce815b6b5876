// Two walks over S = x rᵀ for the fused CPU losses whose per-anchor state folds piece by
// piece (online log-sum-exps: GeneralizedLifted, Lifted, Circle): the general one streams
// chunks of references against all rows; the batch against itself visits the blocks I <= J
// of the symmetric S once (sym_blocks.h), half the similarity products, one gradient product
// per block pair.
#pragma once

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/types.h>

#include "cpu/block_transpose.h"
#include "cpu/op_checks.h"
#include "cpu/sym_blocks.h"

namespace metrix_ops {

// a scratch row of at least n entries, one per thread (the row functions' exp arguments)
template <typename T>
T* scratch_row(int64_t n) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// How S is walked. General: x against r in chunks of `chunk` references, each chunk all
// rows. Self (r is x, self pairs excluded): the blocks I <= J of the symmetric S = x xᵀ once
// (sym_blocks.h), an off-diagonal block also serving J's rows through its transposed copy:
// half the similarity products, and one gradient product per block pair. sq: the squared
// norms of rows of any norm (walk_norms: x's, then, general, r's), whose tiles the walk
// hands on as 1 − d²/2 (raw_to_unit_sims per block; the general walk row by row,
// raw_row_to_unit_sims) and whose gradient gains d²'s radial part; undefined for unit rows.
struct Walk {
  const at::Tensor& x;
  const at::Tensor& r;
  bool self;
  int64_t chunk;
  at::Tensor sq = {};
};

// Walk's sq for rows of any norm: x's squared norms, and for the general walk r's after them
inline at::Tensor walk_norms(const at::Tensor& x, const at::Tensor& r, bool self) {
  return self ? sq_norms(x) : at::cat({sq_norms(x), sq_norms(r)}).contiguous();
}

// rows [0, nr) of tile s (nr×nc; global rows r0.., columns c0..) through fn(row, nc, gi, c0)
template <typename T, class F>
void tile_rows(T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc, F& fn) {
  at::parallel_for(0, nr, row_grain(nc), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) fn(s + i * nc, nc, r0 + i, c0);
  });
}

// fn(row, nc, gi, c0) for every row of S, in pieces of at most `chunk` columns (read only)
template <typename T, class F>
void walk_rows(const Walk& w, F&& fn) {
  if (!w.self) {
    const int64_t B = w.x.size(0), M = w.r.size(0);
    const T* sq = w.sq.defined() ? w.sq.data_ptr<T>() : nullptr;
    const T tiny = raw_zero_tiny<T>(w.x.size(1));
    for (int64_t start = 0; start < M; start += w.chunk) {
      const int64_t len = std::min(w.chunk, M - start);
      at::Tensor s = at::mm(w.x, w.r.narrow(0, start, len).t()).contiguous();
      // rows of any norm: each row rewritten as 1 − d²/2 into a thread's own row just
      // before fn reads it (not in place: the B × chunk block outgrows the caches, and
      // dirtied lines are written back to memory)
      auto row_fn = [&](T* row, int64_t nc, int64_t gi, int64_t c0) {
        if (sq == nullptr) return fn(row, nc, gi, c0);
        thread_local std::vector<T> unit;  // (not scratch_row's buffer: fn may use that)
        if (int64_t(unit.size()) < nc) unit.resize(nc);
        raw_row_to_unit_sims(row, unit.data(), nc, sq[gi], sq + B + c0, tiny);
        fn(unit.data(), nc, gi, c0);
      };
      tile_rows(s.data_ptr<T>(), 0, B, start, len, row_fn);
    }
    return;
  }
  std::vector<T> st;  // an off-diagonal block transposed: its columns' rows
  for_upper_blocks(w.x, w.chunk, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    T* sp = s.data_ptr<T>();
    if (w.sq.defined())
      raw_to_unit_sims(sp, nr, nc, r0, c0, w.sq.data_ptr<T>(), w.x.size(1));
    tile_rows(sp, r0, nr, c0, nc, fn);
    if (c0 == r0) return;
    st.resize(nr * nc);
    transpose_block(sp, nr, nc, st.data());
    tile_rows(st.data(), c0, nc, r0, nr, fn);
  });
}

// grad(row, nc, gi, c0) overwrites every row of S with its row of G = ∂L/∂S, and the walk
// adds dx += G r, dr += Gᵀ x (self: dx += (G + Gᵀ) x, dr untouched).
template <typename T, class F>
void walk_grad(const Walk& w, at::Tensor& dx, at::Tensor& dr, F&& grad) {
  if (!w.self) {
    const int64_t B = w.x.size(0), M = w.r.size(0);
    const T* sq = w.sq.defined() ? w.sq.data_ptr<T>() : nullptr;
    const T tiny = raw_zero_tiny<T>(w.x.size(1));
    // rows of any norm: Σ_j G_ij over the chunks (dx's radial part at the end), and per
    // chunk Σ_i G_ij, summed by each thread over its rows into its own row of a
    // threads × chunk buffer (so dr's last bits depend on the thread count)
    at::Tensor gsum = sq ? at::zeros({B, 1}, dx.options()) : at::Tensor();
    T* gs = sq ? gsum.data_ptr<T>() : nullptr;
    const int64_t threads = at::get_num_threads();
    std::vector<T> colsums;
    for (int64_t start = 0; start < M; start += w.chunk) {
      const int64_t len = std::min(w.chunk, M - start);
      at::Tensor rc = w.r.narrow(0, start, len);
      at::Tensor s = at::mm(w.x, rc.t()).contiguous();  // becomes G in place
      if (sq) colsums.assign(threads * len, T(0));
      // the rewrite and the radial sums row by row, while the row is in cache (not as
      // passes over the B × chunk block, which outgrows the caches)
      auto row_grad = [&](T* row, int64_t nc, int64_t gi, int64_t c0) {
        if (sq != nullptr) raw_row_to_unit_sims(row, row, nc, sq[gi], sq + B + c0, tiny);
        grad(row, nc, gi, c0);
        if (sq == nullptr) return;
        T* cs = colsums.data() + at::get_thread_num() * nc;
        // eight partial row sums: one running sum is a chain of dependent adds that the
        // compiler may not reorder (it took ~10 % of the backward)
        T part[8] = {};
        int64_t j = 0;
        for (; j + 8 <= nc; j += 8)
          for (int k = 0; k < 8; ++k) {
            part[k] += row[j + k];
            cs[j + k] += row[j + k];
          }
        for (; j < nc; ++j) {
          part[0] += row[j];
          cs[j] += row[j];
        }
        T acc = 0;
        for (int k = 0; k < 8; ++k) acc += part[k];
        gs[gi] += acc;
      };
      tile_rows(s.data_ptr<T>(), 0, B, start, len, row_grad);
      dx.addmm_(s, rc);
      at::Tensor drc = dr.narrow(0, start, len);
      drc.addmm_(s.t(), w.x);
      if (sq) {  // ∂s̃_ij/∂r_j = x_i − r_j: less (Σ_i G_ij)·r_j
        at::Tensor cs = at::from_blob(colsums.data(), {threads, len}, dx.options());
        drc.addcmul_(cs.sum(0).unsqueeze(1), rc, -1);
      }
    }
    if (sq) dx.addcmul_(gsum, w.x, -1);  // ∂s̃_ij/∂x_i = r_j − x_i: less (Σ_j G_ij)·x_i
    return;
  }
  // tiled transposes (block_transpose.h), not ATen's strided copies of s.t(), which took
  // a sixth of CircleLoss's time at B = 4096, D = 128
  std::vector<T> st;
  for_upper_blocks(w.x, w.chunk, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    T* sp = s.data_ptr<T>();
    if (w.sq.defined())
      raw_to_unit_sims(sp, nr, nc, r0, c0, w.sq.data_ptr<T>(), w.x.size(1));
    st.resize(nr * nc);
    if (c0 == r0) {  // G of a diagonal block; H = G + Gᵀ (st: a copy of G)
      tile_rows(sp, r0, nr, c0, nc, grad);
      std::copy(sp, sp + nr * nc, st.data());
    } else {  // G_IJ, and G_JI from the transposed block before s is overwritten
      transpose_block(sp, nr, nc, st.data());
      tile_rows(sp, r0, nr, c0, nc, grad);
      tile_rows(st.data(), c0, nc, r0, nr, grad);
    }
    add_transposed(sp, nr, nc, st.data());
    add_sym_block_grad(dx, w.x, s, r0, nr, c0, nc);
    if (w.sq.defined()) add_sym_block_radial(dx, w.x, s, r0, nr, c0, nc);
  });
}

}  // namespace metrix_ops
