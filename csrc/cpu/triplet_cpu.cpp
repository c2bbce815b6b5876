// Fused TripletMarginLoss, triplets_per_anchor="all", on the CPU: per-anchor sums over all
// (p, n) of [(k_ap − k_an) + m]₊ without enumerating triplets or storing the B×M matrix.
//
// Per anchor row: with few positives (≤ kDensePositives) every (p, n) is evaluated, vectorised
// over the negatives. Otherwise sort the positive keys; for a negative n the active positives
// are a suffix (common/triplet.h), so its triplets cost one binary search and a suffix sum:
// O(M log P) per row instead of O(P·N).
// S is streamed over chunks of anchor rows (chunk × M); the backward recomputes each chunk,
// turns it into G = ∂(Σ_i g_i row_i)/∂S in place and adds G r to dx and Gᵀ x to dr. For L2
// the block holds distances (triplet_value_block), G goes through dd/ds = −1/d, and the
// gradient takes cdist's radial part too (add_triplet_block_grad): exact for raw rows.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/triplet.h"
#include "cpu/op_checks.h"
#include "cpu/triplet_blocks.h"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

// Forward of rows [r0, r0 + nr) from their block s of values (nr × m). For a negative with
// c active positives (the top c keys): Σ_p [(k_p − k_n) + m]₊ = Σ_top-c k_p + c·(m − k_n).
template <typename T>
void fwd_block(const T* s, int64_t nr, int64_t m, int64_t r0, const TripletCtx& c,
               T* rows, int64_t* nonzero, int64_t* triplets) {
  at::parallel_for(0, nr, 4, [&](int64_t i0, int64_t i1) {
    SortedPositives<T> pos;
    std::vector<double> suffix;  // suffix[t] = Σ_{q ≥ t} sorted positive keys, in double
    std::vector<T> kn;           // the dense path's negative keys
    const T mg = T(c.margin);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = r0 + i, li = c.labels[gi], self = c.exclude_diag ? gi : -1;
      const T* row = s + i * m;
      pos.build(row, m, c.ref_labels, li, self, c.cosine);
      const int64_t np = pos.size();
      const int64_t nn = m - np - (self >= 0 ? 1 : 0);
      triplets[gi] = np * nn;
      double sum = 0;
      int64_t active = 0;
      if (np > 0 && nn > 0 && np <= kDensePositives) {
        kn.resize(m);
        negative_keys(row, m, c.ref_labels, li, self, c.cosine, kn.data());
        dense_row_sum(pos, kn.data(), m, mg, KeepAll{}, sum, active);
      } else if (np > 0 && nn > 0) {
        suffix.assign(np + 1, 0.0);
        for (int64_t t = np - 1; t >= 0; --t) suffix[t] = suffix[t + 1] + double(pos.keys[t]);
        for (int64_t j = 0; j < m; ++j) {
          if (j == self || c.ref_labels[j] == li) continue;
          const T kn = tri_key(row[j], c.cosine);
          const int64_t cnt = tri_count_pos(pos.keys.data(), (long)np, kn, mg);
          sum += suffix[np - cnt] + double(cnt) * (c.margin - double(kn));
          active += cnt;
        }
      }
      rows[gi] = T(sum);
      nonzero[gi] = active;
    }
  });
}

// Turns block s (rows [r0, r0 + nr)) into g_i ∂row_i/∂s_ij in place:
//   negative j: −(active positives with it) · dk/ds;
//   positive j: (active negatives with it) · dk/ds. A negative whose active positives start
//   at sorted rank t is active with every positive of rank ≥ t, so these counts are the
//   running sum of a histogram of the negatives' first ranks.
template <typename T>
void grad_block(T* s, int64_t nr, int64_t m, int64_t r0, const TripletCtx& c, const T* g) {
  at::parallel_for(0, nr, 4, [&](int64_t i0, int64_t i1) {
    SortedPositives<T> pos;
    std::vector<int64_t> first;  // histogram over the first active rank, 0..P
    std::vector<T> kn, cnt;      // the dense path's negative keys and active counts
    const T mg = T(c.margin);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = r0 + i, li = c.labels[gi], self = c.exclude_diag ? gi : -1;
      T* row = s + i * m;
      pos.build(row, m, c.ref_labels, li, self, c.cosine);
      const int64_t np = pos.size();
      if (np == 0 || np + (self >= 0 ? 1 : 0) == m || g[gi] == T(0)) {
        std::fill(row, row + m, T(0));
        continue;
      }
      if (np <= kDensePositives) {
        kn.resize(m), cnt.resize(m);
        negative_keys(row, m, c.ref_labels, li, self, c.cosine, kn.data());
        dense_row_grad(row, pos, kn.data(), cnt.data(), m, mg, g[gi], c.cosine, self, KeepAll{});
        continue;
      }
      first.assign(np + 1, 0);
      for (int64_t j = 0; j < m; ++j) {
        if (j == self || c.ref_labels[j] == li) continue;
        const T kn = tri_key(row[j], c.cosine);
        const int64_t cnt = tri_count_pos(pos.keys.data(), (long)np, kn, mg);
        ++first[np - cnt];
        row[j] = -g[gi] * T(cnt) * tri_key_grad(kn, c.cosine);
      }
      int64_t active = 0;
      for (int64_t t = 0; t < np; ++t) {
        active += first[t];
        const T kp = pos.kj[t].first;
        row[pos.kj[t].second] = g[gi] * T(active) * tri_key_grad(kp, c.cosine);
      }
      if (self >= 0) row[self] = T(0);
    }
  });
}

}  // namespace

// Returns per-anchor (loss sum, #triplets with loss > 0, #triplets); the reducers need
// nothing else: AvgNonZero = Σ rows / Σ nonzero, Mean = Σ rows / Σ triplets, Sum = Σ rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_all_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double margin,
    int64_t chunk, bool raw_sq) {
  check_triplet_inputs(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  check_raw_sq(cosine, raw_sq);
  // fp16/bf16 are computed in fp32 (acc_type); fp32 and fp64 as given
  auto x = x_.to(acc_type(x_)).contiguous(), r = r_.to(acc_type(x_)).contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor nonzero = at::zeros({B}, labels.options()), triplets = at::zeros({B}, labels.options());
  const TripletCtx c{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag,
                     cosine, margin};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_all_fwd_cpu", [&] {
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine, raw_sq);
      fwd_block<scalar_t>(s.data_ptr<scalar_t>(), len, M, start, c, rows.data_ptr<scalar_t>(),
                          nonzero.data_ptr<int64_t>(), triplets.data_ptr<int64_t>());
    }
  });
  return {rows, nonzero, triplets};
}

std::tuple<at::Tensor, at::Tensor> triplet_all_bwd_cpu(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, bool exclude_diag, bool cosine,
    double margin, int64_t chunk, bool raw_sq) {
  check_triplet_inputs(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  check_raw_sq(cosine, raw_sq);
  check_vec(grad_rows_, x_.size(0), "grad_rows");
  auto x = x_.to(acc_type(x_)).contiguous(), r = r_.to(acc_type(x_)).contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows_.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  at::Tensor col_sums = at::zeros({M}, x.options());  // (L2: add_triplet_block_grad)
  const TripletCtx c{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag,
                     cosine, margin};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_all_bwd_cpu", [&] {
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine, raw_sq);  // becomes G
      grad_block<scalar_t>(s.data_ptr<scalar_t>(), len, M, start, c, g.data_ptr<scalar_t>());
      add_triplet_block_grad(dx, dr, col_sums, s, x, r, start, len, cosine, raw_sq);
    }
  });
  finish_triplet_grad(dr, col_sums, r, cosine, raw_sq);
  return {dx.to(x_.scalar_type()), dr.to(r_.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // All-triplets margin loss of unit anchors x against unit references r, streamed over
  // chunks of x: per-anchor (loss sum, #active triplets, #triplets). cosine=false is the
  // L2 distance of unit rows (or of rows of any norm: the op reads cdist's d and its
  // gradient). exclude_diag: r is the batch, so row i is not its own pair. raw_sq (CPU
  // only, with cosine): rows of any norm, their squared L2 through the cosine keys of
  // 1 − d²/2 (the caller halves the margin and doubles the terms).
  m.def("triplet_all_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "bool exclude_diag, bool cosine, float margin, int chunk, bool raw_sq=False) "
        "-> (Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("triplet_all_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, "
        "Tensor ref_labels, bool exclude_diag, bool cosine, float margin, int chunk, "
        "bool raw_sq=False) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("triplet_all_fwd", &triplet_all_fwd_cpu);
  m.impl("triplet_all_bwd", &triplet_all_bwd_cpu);
}

}  // namespace metrix_ops
