// TripletMarginLoss over the triplets a TripletMarginMiner keeps, inside one streaming op
// (the loss option miner=): per-anchor sums and counts, no triplet list, no B×M matrix.
//
// As the all-triplets op (triplet_cpu.cpp): hinge terms of a row with at most
// kDensePositives positives are evaluated for every (p, n) in SIMD lanes, with the miner's
// keep rule per triplet (triplet_blocks.h). Otherwise, per anchor row, sort the positive keys; for a
// negative n, the positives the miner keeps are a window of sorted ranks and those with
// loss > 0 a suffix (common/triplet.h), so the kept triplets with loss > 0 are a window too:
// each negative costs a few binary searches and a prefix-sum difference, O(M log P) a row.
// The miner and the loss share the distance (the Python side checks), so one key serves
// both. The backward recomputes each chunk and turns it into G in place, as triplet_cpu.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/triplet.h"
#include "cpu/triplet_blocks.h"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

struct MineRule {
  int kind;       // TriMineKind
  double margin;  // the miner's margin m2
  bool smooth;    // the loss's smooth_loss: softplus terms, summed over the kept window
};

// For each negative j of the row (anchor label li, column `self` skipped): f(j, kn, klo,
// khi, lo, hi) with [klo, khi) the sorted ranks of the positives the miner keeps with j and
// [lo, hi) those of them whose hinge term is > 0 (each empty when hi ≤ lo, normalised so).
template <typename T, typename F>
void for_negatives(const T* row, int64_t m, const TripletCtx& c, const MineRule& rule,
                   int64_t li, int64_t self, const SortedPositives<T>& pos, F f) {
  const long np = long(pos.size());
  const T mg = T(c.margin), m2 = T(rule.margin);
  for (int64_t j = 0; j < m; ++j) {
    if (j == self || c.ref_labels[j] == li) continue;
    const T kn = tri_key(row[j], c.cosine);
    long klo, khi;
    tri_mined_window(pos.keys.data(), np, kn, rule.kind, m2, &klo, &khi);
    khi = std::max(klo, khi);
    const long lo = std::max(klo, tri_first_active(pos.keys.data(), np, kn, mg));
    f(j, kn, klo, khi, lo, std::max(lo, khi));
  }
}

// f(keep) with the miner's keep rule for the dense path (triplet_blocks.h)
template <typename T, typename F>
void with_keep(const MineRule& rule, F&& f) {
  const T m2 = T(rule.margin);
  switch (rule.kind) {
    case kTriMineAll: f(KeepMined<kTriMineAll, T>{m2}); break;
    case kTriMineHard: f(KeepMined<kTriMineHard, T>{m2}); break;
    case kTriMineSemihard: f(KeepMined<kTriMineSemihard, T>{m2}); break;
    default: f(KeepMined<kTriMineEasy, T>{m2}); break;
  }
}

// the dense path: few positives, hinge terms (smooth_loss's softplus stays on the searches)
inline bool dense_rows(int64_t np, const MineRule& rule) {
  return !rule.smooth && np <= kDensePositives;
}

// Rows [r0, r0 + nr) from their block s: Σ over kept triplets of [(k_p − k_n) + m]₊, their
// number with loss > 0, and the number kept. Over a window of active positives the sum is
// Σ k_p + c·(m − k_n), from prefix sums in double. smooth: softplus of every kept
// triplet, one by one (O(kept) a row: the terms are no longer linear in the keys).
template <typename T>
void mined_fwd_block(const T* s, int64_t nr, int64_t m, int64_t r0, const TripletCtx& c,
                     const MineRule& rule, T* rows, int64_t* nonzero, int64_t* kept_out) {
  at::parallel_for(0, nr, 4, [&](int64_t i0, int64_t i1) {
    SortedPositives<T> pos;
    std::vector<double> pre;  // pre[t] = Σ_{q < t} sorted positive keys
    std::vector<T> kn;        // the dense path's negative keys
    const T mg = T(c.margin);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = r0 + i, li = c.labels[gi], self = c.exclude_diag ? gi : -1;
      pos.build(s + i * m, m, c.ref_labels, li, self, c.cosine);
      const int64_t np = pos.size();
      pre.assign(np + 1, 0.0);
      for (int64_t t = 0; t < np; ++t) pre[t + 1] = pre[t] + double(pos.keys[t]);
      double sum = 0;
      int64_t active = 0, kept = 0;
      if (np > 0 && dense_rows(np, rule)) {
        kn.resize(m);
        negative_keys(s + i * m, m, c.ref_labels, li, self, c.cosine, kn.data());
        with_keep<T>(rule, [&](auto keep) {
          dense_row_sum(pos, kn.data(), m, mg, keep, sum, active, &kept);
        });
      } else if (np > 0)
        for_negatives(s + i * m, m, c, rule, li, self, pos,
                      [&](int64_t, T kn, long klo, long khi, long lo, long hi) {
                        kept += khi - klo;
                        if (rule.smooth) {
                          for (long t = klo; t < khi; ++t) {
                            const T term = tri_softplus(tri_violation(pos.keys[t], kn, mg));
                            sum += double(term);
                            active += term > T(0);
                          }
                          return;
                        }
                        const long cnt = hi - lo;
                        sum += (pre[hi] - pre[lo]) + double(cnt) * (c.margin - double(kn));
                        active += cnt;
                      });
      rows[gi] = T(sum);
      nonzero[gi] = active;
      kept_out[gi] = kept;
    }
  });
}

// Block s (rows [r0, r0 + nr)) becomes g_i ∂row_i/∂s_ij in place: a negative gets
// −(its active kept positives) · dk/ds, a positive +(the negatives whose window holds its
// rank) · dk/ds, the latter from a difference array over the ranks. smooth: each kept
// triplet's softplus' instead of 1, accumulated per rank.
template <typename T>
void mined_grad_block(T* s, int64_t nr, int64_t m, int64_t r0, const TripletCtx& c,
                      const MineRule& rule, const T* g) {
  at::parallel_for(0, nr, 4, [&](int64_t i0, int64_t i1) {
    SortedPositives<T> pos;
    std::vector<int64_t> diff;
    std::vector<T> wpos;  // smooth: Σ over the kept negatives of softplus' per rank
    std::vector<T> kn, cnt;  // the dense path's negative keys and active counts
    const T mg = T(c.margin);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t gi = r0 + i, li = c.labels[gi], self = c.exclude_diag ? gi : -1;
      T* row = s + i * m;
      pos.build(row, m, c.ref_labels, li, self, c.cosine);
      const int64_t np = pos.size();
      if (np == 0 || g[gi] == T(0)) {
        std::fill(row, row + m, T(0));
        continue;
      }
      if (dense_rows(np, rule)) {
        kn.resize(m), cnt.resize(m);
        negative_keys(row, m, c.ref_labels, li, self, c.cosine, kn.data());
        with_keep<T>(rule, [&](auto keep) {
          dense_row_grad(row, pos, kn.data(), cnt.data(), m, mg, g[gi], c.cosine, self, keep);
        });
        continue;
      }
      diff.assign(np + 1, 0);
      wpos.assign(np, T(0));
      for_negatives(row, m, c, rule, li, self, pos,
                    [&](int64_t j, T kn, long klo, long khi, long lo, long hi) {
                      T w = T(hi - lo);
                      if (rule.smooth) {
                        w = T(0);
                        for (long t = klo; t < khi; ++t) {
                          const T d = tri_softplus_grad(tri_violation(pos.keys[t], kn, mg));
                          wpos[t] += d;
                          w += d;
                        }
                      } else {
                        ++diff[lo];
                        --diff[hi];
                      }
                      row[j] = -g[gi] * w * tri_key_grad(kn, c.cosine);
                    });
      int64_t active = 0;
      for (int64_t t = 0; t < np; ++t) {
        active += diff[t];
        const T w = rule.smooth ? wpos[t] : T(active);
        row[pos.kj[t].second] = g[gi] * w * tri_key_grad(pos.kj[t].first, c.cosine);
      }
      if (self >= 0) row[self] = T(0);
    }
  });
}

}  // namespace

// Per anchor (loss sum, #kept triplets with loss > 0, #kept triplets): the totals the
// reducers AvgNonZero, Mean and Sum need.
std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_mined_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double margin,
    int64_t mine_kind, double mine_margin, bool smooth, int64_t chunk, bool raw_sq) {
  check_triplet_inputs(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  check_mine_rule(mine_kind, mine_margin);
  check_raw_sq(cosine, raw_sq);
  auto x = x_.to(acc_type(x_)).contiguous(), r = r_.to(acc_type(x_)).contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor nonzero = at::zeros({B}, labels.options()), kept = at::zeros({B}, labels.options());
  const TripletCtx c{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag,
                     cosine, margin};
  const MineRule rule{int(mine_kind), mine_margin, smooth};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_mined_fwd_cpu", [&] {
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine, raw_sq);
      mined_fwd_block<scalar_t>(s.data_ptr<scalar_t>(), len, M, start, c, rule,
                                rows.data_ptr<scalar_t>(), nonzero.data_ptr<int64_t>(),
                                kept.data_ptr<int64_t>());
    }
  });
  return {rows, nonzero, kept};
}

std::tuple<at::Tensor, at::Tensor> triplet_mined_bwd_cpu(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, bool exclude_diag, bool cosine,
    double margin, int64_t mine_kind, double mine_margin, bool smooth, int64_t chunk,
    bool raw_sq) {
  check_triplet_inputs(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  check_mine_rule(mine_kind, mine_margin);
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
  const MineRule rule{int(mine_kind), mine_margin, smooth};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_mined_bwd_cpu", [&] {
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine, raw_sq);  // becomes G
      mined_grad_block<scalar_t>(s.data_ptr<scalar_t>(), len, M, start, c, rule,
                                 g.data_ptr<scalar_t>());
      add_triplet_block_grad(dx, dr, col_sums, s, x, r, start, len, cosine, raw_sq);
    }
  });
  finish_triplet_grad(dr, col_sums, r, cosine, raw_sq);
  return {dx.to(x_.scalar_type()), dr.to(r_.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // TripletMarginLoss over the triplets TripletMarginMiner(mine_margin, kind) keeps, the
  // miner on the loss's distance; arguments as triplet_all_fwd. mine_kind: 0 all, 1 hard,
  // 2 semihard, 3 easy; smooth: softplus terms (smooth_loss). Per anchor (loss sum,
  // #kept with loss > 0, #kept).
  m.def("triplet_mined_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "bool exclude_diag, bool cosine, float margin, int mine_kind, float mine_margin, "
        "bool smooth, int chunk, bool raw_sq=False) -> (Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("triplet_mined_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, "
        "Tensor ref_labels, bool exclude_diag, bool cosine, float margin, int mine_kind, "
        "float mine_margin, bool smooth, int chunk, bool raw_sq=False) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("triplet_mined_fwd", &triplet_mined_fwd_cpu);
  m.impl("triplet_mined_bwd", &triplet_mined_bwd_cpu);
}

}  // namespace metrix_ops
