// Transposes of one block of S (or of its gradient) for the Metrix block walk
// (metrix_blocks.h): dst = srcᵀ, or dst += srcᵀ. A column of a row-major 1024-wide block is
// one element per 4 KiB, so an element-by-element walk down it (or ATen's strided add of a
// .t() view: 3.3 ms for 1024×1024 on the 2-core VM) misses cache on every element. Here
// 32×32 tiles, each as 8×8 register transposes under AVX2 (fp32: eight rows of eight loaded,
// shuffled, stored as eight columns), scalar elsewhere and for fp64.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/ms_kernels.h"  // cpu_has

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace metrix_ops {

namespace transpose_detail {

constexpr int64_t kTile = 32;

#if defined(__x86_64__) && defined(__GNUC__)
// the 8×8 block at src (row stride ls) transposed into dst (row stride ld), or added to it
template <bool Add>
__attribute__((target("avx2"))) inline void tr8x8(const float* src, int64_t ls, float* dst,
                                                  int64_t ld) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * ls);
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {
    r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x20);
    t[k + 4] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x31);
  }
  for (int k = 0; k < 8; ++k) {
    float* out = dst + k * ld;
    _mm256_storeu_ps(out, Add ? _mm256_add_ps(_mm256_loadu_ps(out), t[k]) : t[k]);
  }
}

template <bool Add>
__attribute__((target("avx2"))) void tile_avx2(const float* src, int64_t ls, float* dst,
                                               int64_t ld, int64_t ni, int64_t nj) {
  for (int64_t j = 0; j < nj; j += 8)
    for (int64_t i = 0; i < ni; i += 8) tr8x8<Add>(src + i * ls + j, ls, dst + j * ld + i, ld);
}

inline bool has_avx2() {
  static const bool yes = cpu_has("avx2");  // read once: tile() asks per 32×32 tile
  return yes;
}
#endif

// dst[j][i] (=|+=) src[i][j] for the ni × nj tile at src (row stride ls), dst row stride ld
template <bool Add, typename T>
void tile(const T* src, int64_t ls, T* dst, int64_t ld, int64_t ni, int64_t nj) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>)
    if (ni % 8 == 0 && nj % 8 == 0 && has_avx2()) return tile_avx2<Add>(src, ls, dst, ld, ni, nj);
#endif
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t i = 0; i < ni; ++i) {
      if constexpr (Add) dst[j * ld + i] += src[i * ls + j];
      else dst[j * ld + i] = src[i * ls + j];
    }
}

// the tiles of src (rows × cols, contiguous) into dst (cols × rows, contiguous)
template <bool Add, typename T>
void tiles(const T* src, int64_t rows, int64_t cols, T* dst) {
  const int64_t t = kTile;
  at::parallel_for(0, (rows + t - 1) / t, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i0 = b0 * t; i0 < std::min(rows, b1 * t); i0 += t)
      for (int64_t j0 = 0; j0 < cols; j0 += t)
        tile<Add>(src + i0 * cols + j0, cols, dst + j0 * rows + i0, rows,
                  std::min(t, rows - i0), std::min(t, cols - j0));
  });
}

}  // namespace transpose_detail

// dst (cols × rows, contiguous) = srcᵀ, src rows × cols contiguous
template <typename T>
void transpose_block(const T* src, int64_t rows, int64_t cols, T* dst) {
  transpose_detail::tiles<false>(src, rows, cols, dst);
}

// dst (rows × cols, contiguous) += srcᵀ, src cols × rows contiguous (not dst itself)
template <typename T>
void add_transposed(T* dst, int64_t rows, int64_t cols, const T* src) {
  transpose_detail::tiles<true>(src, cols, rows, dst);
}

}  // namespace metrix_ops
