// Rows summed from weighted rows of another matrix, race-free and reproducible: the listed
// (key, other, weight) entries are bucketed by key with a stable counting sort (CSR, O(P + n)
// memory), and each output row is summed by one thread in the entries' own order, so the
// result is bitwise identical whatever the number of threads and no thread-private B×D
// buffers are needed (a parallel scatter would race, or need atomics whose summation order,
// hence the rounding, changes from run to run). Used by the listed-pairs backward
// (pair_sims_cpu.cpp) and the HPHN picks' backward (hphn_picks_cpu.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

namespace metrix_ops {

// pairs per parallel task: about 32k multiply-adds
inline int64_t pair_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

// Eight partial sums in a fixed order: the compiler may not reorder a floating-point sum
// (no -ffast-math), so a single accumulator would run one scalar add per element; eight
// independent lanes vectorise, and the result still does not depend on threads or tiling.
template <typename T>
inline T row_dot(const T* __restrict a, const T* __restrict b, int64_t D) {
  constexpr int L = 8;
  T acc[L] = {};  // T: fp32 for fp32, fp64 for fp64
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int l = 0; l < L; ++l) acc[l] += a[d + l] * b[d + l];
  T tail = 0;
  for (; d < D; ++d) tail += a[d] * b[d];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// The pairs bucketed by key (a stable counting sort, O(P + n)): bucket i holds the pairs
// with key i, in their order in the list, as (other end, incoming gradient) copied into
// bucket order, so that the hot loop reads them sequentially instead of gathering two
// scattered values per pair.
template <typename T>
struct Buckets {
  std::vector<int64_t> off, other;
  std::vector<T> grad;
  Buckets(const int64_t* key, const int64_t* other_end, const T* g, int64_t P, int64_t n)
      : off(n + 1, 0), other(P), grad(P) {
    for (int64_t k = 0; k < P; ++k) ++off[key[k] + 1];
    for (int64_t i = 0; i < n; ++i) off[i + 1] += off[i];
    std::vector<int64_t> at(off.begin(), off.end() - 1);
    for (int64_t k = 0; k < P; ++k) {
      const int64_t q = at[key[k]]++;
      other[q] = other_end[k];
      grad[q] = g[k];
    }
  }
};

// out[i] = Σ_{pairs q in bucket i} grad_q · src[other_q], one output row per task
template <typename T>
void gather_rows(T* out, const T* src, const Buckets<T>& b, int64_t n, int64_t D) {
  const int64_t per = std::max<int64_t>(1, int64_t(b.other.size()) / std::max<int64_t>(n, 1));
  at::parallel_for(0, n, std::max<int64_t>(1, pair_grain(D) / per), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* __restrict o = out + i * D;
      for (int64_t q = b.off[i]; q < b.off[i + 1]; ++q) {
        const T gq = b.grad[q];
        const T* __restrict s = src + b.other[q] * D;
        for (int64_t d = 0; d < D; ++d) o[d] += gq * s[d];
      }
    }
  });
}

}  // namespace metrix_ops
