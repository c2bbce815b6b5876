// Pieces of the fused triplet ops shared by triplet_cpu.cpp (all triplets) and
// triplet_mined_cpu.cpp (the triplets a TripletMarginMiner keeps): the row's sorted
// positives and the dense paths. CPU-only, so inline definitions carry no ODR risk (see
// cpu/op_checks.h). The argument checks and the block of values the keys come from serve
// the CUDA op too: common/checks.h.
#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/triplet.h"
#include "cpu/op_checks.h"

namespace metrix_ops {

struct TripletCtx {
  const int64_t* labels;
  const int64_t* ref_labels;
  bool exclude_diag, cosine;
  double margin;
};

// A row's positive keys with their columns, sorted by key. Only the positives are sorted
// (typically a handful): each negative then finds its active positives, a suffix, by
// binary search, so a row costs O(M log P) and the negatives are never sorted.
template <typename T>
struct SortedPositives {
  std::vector<std::pair<T, int64_t>> kj;  // (key, column)
  std::vector<T> keys;

  void build(const T* s, int64_t m, const int64_t* col, int64_t label, int64_t self,
             bool cosine) {
    kj.clear();
    for (int64_t j = 0; j < m; ++j)
      if (j != self && col[j] == label) kj.emplace_back(tri_key(s[j], cosine), j);
    std::sort(kj.begin(), kj.end());
    keys.resize(kj.size());
    for (size_t t = 0; t < kj.size(); ++t) keys[t] = kj[t].first;
  }
  int64_t size() const { return int64_t(kj.size()); }
};

// Rows with few positives (the usual P×K batch: K − 1 of them) take every (p, n) directly,
// vectorised over the negatives: P·M hinge evaluations in SIMD lanes cost less than M scalar
// binary searches (at B = 4096, P = 7 the searches were most of the all-triplets op's time).
// Each triplet's violation (and the miner's gap) is PML's own expression in T, so the kept
// and active sets are the same bit for bit as the searches'.
constexpr int64_t kDensePositives = 64;

// The row's negative keys with +inf in every other column (its positives and self pair):
// (k_p − inf) + m = −inf is inactive for every p, and keep rules reject inf
template <typename T>
void negative_keys(const T* row, int64_t m, const int64_t* col, int64_t label, int64_t self,
                   bool cosine, T* kn) {
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < m; ++j)
    kn[j] = (j == self || col[j] == label) ? inf : tri_key(row[j], cosine);
}

// Every triplet counts (the all-triplets loss)
struct KeepAll {
  template <typename T>
  bool operator()(T, T) const { return true; }
};

// The triplets a TripletMarginMiner keeps, by the gap g = k_n − k_p against its margin m2
// (common/triplet.h's rules, here per triplet): all g ≤ m2; hard g ≤ min(m2, 0); semihard
// 0 < g ≤ m2; easy g > m2. A column of key inf (no negative) is never kept.
template <int Kind, typename T>
struct KeepMined {
  T m2;
  bool operator()(T kp, T kn) const {
    const T g = tri_gap(kp, kn);
    const bool real = kn < std::numeric_limits<T>::infinity();
    if constexpr (Kind == kTriMineAll) return real & (g <= m2);
    if constexpr (Kind == kTriMineHard) return real & (g <= (m2 < T(0) ? m2 : T(0)));
    if constexpr (Kind == kTriMineSemihard) return real & (g > T(0)) & (g <= m2);
    return real & (g > m2);
  }
};

// Σ over the row's kept triplets of [(k_p − k_n) + m]₊ (per positive in T lanes, then
// double), the number of those > 0 and (kept) the number kept
template <typename T, class Keep>
void dense_row_sum(const SortedPositives<T>& pos, const T* kn, int64_t m, T mg, Keep keep,
                   double& sum, int64_t& active, int64_t* kept = nullptr) {
  for (int64_t t = 0; t < pos.size(); ++t) {
    const T kp = pos.keys[t];
    T acc = T(0);
    int64_t cnt = 0, nk = 0;
    _Pragma("omp simd reduction(+ : acc, cnt, nk)")
    for (int64_t j = 0; j < m; ++j) {
      const T v = tri_violation(kp, kn[j], mg);
      const bool k = keep(kp, kn[j]);
      const bool a = k & (v > T(0));
      acc += a ? v : T(0);
      cnt += a;
      nk += k;
    }
    sum += double(acc);
    active += cnt;
    if (kept) *kept += nk;
  }
}

// G of a row with few positives: each negative −g (#kept active positives) dk/ds, each
// positive g (#kept active negatives) dk/ds, the self pair 0 (cnt: m scratch entries)
template <typename T, class Keep>
void dense_row_grad(T* row, const SortedPositives<T>& pos, const T* kn, T* cnt, int64_t m,
                    T mg, T g, bool cosine, int64_t self, Keep keep) {
  std::fill(cnt, cnt + m, T(0));
  for (int64_t t = 0; t < pos.size(); ++t) {
    const T kp = pos.keys[t];
    int64_t act = 0;
    _Pragma("omp simd reduction(+ : act)")
    for (int64_t j = 0; j < m; ++j) {
      const bool a = keep(kp, kn[j]) & tri_active(kp, kn[j], mg);
      cnt[j] += a ? T(1) : T(0);
      act += a;
    }
    row[pos.kj[t].second] = T(act);  // kept here until the negatives are written
  }
  T* out = cnt;  // the negatives' G (0 where kn = inf: no active positive)
  _Pragma("omp simd")
  for (int64_t j = 0; j < m; ++j) out[j] = -g * cnt[j] * tri_key_grad(kn[j], cosine);
  for (int64_t t = 0; t < pos.size(); ++t) {
    const int64_t j = pos.kj[t].second;
    out[j] = g * row[j] * tri_key_grad(pos.keys[t], cosine);
  }
  if (self >= 0) out[self] = T(0);
  std::copy(out, out + m, row);
}

}  // namespace metrix_ops
