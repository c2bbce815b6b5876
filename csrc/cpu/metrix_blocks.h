// The block walk shared by the fused "loss + embedding-level Metrix" ops of a batch against
// itself (ms_metrix_self_cpu.cpp, contrastive_metrix_self_cpu.cpp): one pass over the
// symmetric S = X Xᵀ, the mixed candidates closed-form functions of the same blocks
// (common/metrix_mix.h), so the Metrix term adds per-element work and no matrix product.
//
// The batch must be sorted by label (the Python side sorts it): blocks are cut between
// classes, so an anchor's positives are rows of its own block and their rows of S are at
// hand (metrix_mix_kernels.h). A class larger than `block` makes a larger block.
//
// Block (I, J), I < J, serves the anchors of I against the negatives in J through s, and
// those of J against I through sᵀ (a tiled transpose of the block: the mixed terms read two
// rows of S per candidate, which a column walk would make strided), one class at a time
// (MixLayout::side_tiles), with the 1/‖v‖ of the class's rows computed beside them. The within-class cosines
// s_ap, which every block of a row needs, are computed once up front (O(B·K·D)). Forward
// keeps per-anchor states only; backward recomputes the blocks.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/block_transpose.h"
#include "cpu/metrix_mix_kernels.h"
#include "cpu/parallel_tasks.h"
#include "cpu/sym_blocks.h"

namespace metrix_ops {

// Classes as runs of the sorted labels, the blocks cut between them, and where each row's
// within-class cosines live.
struct ClassLayout {
  std::vector<int64_t> lo, hi, wc_off, bounds;
  int64_t wc_size = 0;
};

inline ClassLayout class_layout(const at::Tensor& labels, int64_t block) {
  const at::Tensor lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  const int64_t B = lab.size(0);
  ClassLayout c;
  c.lo.resize(B);
  c.hi.resize(B);
  c.wc_off.resize(B);
  c.bounds.push_back(0);
  for (int64_t s = 0; s < B;) {
    int64_t e = s + 1;
    while (e < B && y[e] == y[s]) ++e;
    TORCH_CHECK(e == B || y[e] > y[s], "labels must be sorted (non-decreasing): the Metrix "
                "op cuts its blocks between classes");
    if (e - c.bounds.back() > block && s > c.bounds.back()) c.bounds.push_back(s);
    for (int64_t a = s; a < e; ++a) {
      c.lo[a] = s;
      c.hi[a] = e;
      c.wc_off[a] = c.wc_size + (a - s) * (e - s);
    }
    c.wc_size += (e - s) * (e - s);
    s = e;
  }
  if (B > 0) c.bounds.push_back(B);
  return c;
}

// s_ap for every pair of rows of one class, in the layout's order: a class's rows are
// contiguous (the batch is label-sorted) and its entries a K×K row-major block at the first
// row's wc_off, so each class is one product X_c X_cᵀ written in place (a scalar dot per
// pair, as before, did not vectorise: 2× the mixed term's overhead at B = 4096, D = 512)
template <typename T>
std::vector<T> within_class_cosines(const at::Tensor& x, const ClassLayout& c) {
  std::vector<T> wc(c.wc_size);
  std::vector<int64_t> starts;
  for (int64_t a = 0; a < x.size(0); a = c.hi[a]) starts.push_back(a);
  at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t lo = starts[k], K = c.hi[lo] - lo;
      const at::Tensor xc = x.narrow(0, lo, K).detach();  // mm_out records no graph
      at::Tensor out = at::from_blob(wc.data() + c.wc_off[lo], {K, K}, xc.options());
      at::mm_out(out, xc, xc.t());
    }
  });
  return wc;
}

#if defined(__x86_64__) && defined(__GNUC__)
// mix_inv_norms' fp32 loop 16 at a time, for AVX-512 CPUs; returns how many it did. The
// product and sum round apart (the _round_ forms: a plain mul and add could be contracted
// into an FMA), so every value is the SSE2 loop's, bit for bit.
__attribute__((target("avx512f"))) inline int64_t mix_inv_norms_avx512(const float* s, int64_t n,
                                                                      float q0, float q1,
                                                                      float lo, float* inv) {
  constexpr int kR = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 a = _mm512_set1_ps(q1), b = _mm512_set1_ps(q0), l = _mm512_set1_ps(lo),
               one = _mm512_set1_ps(1.0f);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512 q = _mm512_max_ps(
        l, _mm512_add_round_ps(_mm512_mul_round_ps(_mm512_loadu_ps(s + k), a, kR), b, kR));
    _mm512_storeu_ps(inv + k, _mm512_div_ps(one, _mm512_sqrt_ps(q)));
  }
  return k;
}

inline bool has_avx512f() {
  static const bool yes = cpu_has("avx512");
  return yes;
}
#endif

// 1/‖mix(row, column)‖ for n entries of S: 1/sqrt(max(‖v‖², ε²)) is 1/max(‖v‖, ε) for
// ‖v‖² ≥ 0 (NaN passes). SSE2's (or AVX-512's) square root and division where there are
// (both correctly rounded, as ATen's rsqrt; a scalar std::sqrt does not vectorise, for
// errno), else scalar.
template <typename T>
void mix_inv_norms(const T* s, int64_t n, T lam, T* inv) {
  const T q0 = lam * lam + (1 - lam) * (1 - lam), q1 = 2 * lam * (1 - lam);
  const T lo = T(kMixEps * kMixEps);
  int64_t k = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>)
    if (has_avx512f()) k = mix_inv_norms_avx512(s, n, q0, q1, lo, inv);
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m128 a = _mm_set1_ps(q1), b = _mm_set1_ps(q0), l = _mm_set1_ps(lo),
                 one = _mm_set1_ps(1.0f);
    for (; k + 4 <= n; k += 4) {  // max_ps(l, q) is q where q is NaN
      const __m128 q = _mm_max_ps(l, _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(s + k), a), b));
      _mm_storeu_ps(inv + k, _mm_div_ps(one, _mm_sqrt_ps(q)));
    }
  } else {
    const __m128d a = _mm_set1_pd(q1), b = _mm_set1_pd(q0), l = _mm_set1_pd(lo),
                  one = _mm_set1_pd(1.0);
    for (; k + 2 <= n; k += 2) {
      const __m128d q = _mm_max_pd(l, _mm_add_pd(_mm_mul_pd(_mm_loadu_pd(s + k), a), b));
      _mm_storeu_pd(inv + k, _mm_div_pd(one, _mm_sqrt_pd(q)));
    }
  }
#endif
  for (; k < n; ++k) {
    const T q = s[k] * q1 + q0;
    inv[k] = T(1) / std::sqrt(q < lo ? lo : q);
  }
}

// The per-call constants every Metrix kernel's block side needs.
template <typename T>
struct MixLayout {
  const ClassLayout& cls;
  const int32_t* lab;  // dense label ids, by global row
  const T* wc;
  T lam;
  bool anchor_neg;
  T* gw = nullptr;  // backward: ∂L/∂s_ap, laid out as wc

  // The geometry of anchors in the rows r0.. of s (nc columns a row, contiguous) against its
  // columns c0..; inv and gm (backward, else null) are laid out as s
  MixGeom<T> geom(const T* s, const T* inv, int64_t nc, int64_t r0, int64_t c0, T* gm) const {
    return MixGeom<T>{s, inv, nc, r0, c0, lab, lab, cls.lo.data(), cls.hi.data(), wc,
                      cls.wc_off.data(), lam, anchor_neg, gm, gw};
  }

  // the first row of each class among the rows [r0, r0 + nr)
  std::vector<int64_t> class_starts(int64_t r0, int64_t nr) const {
    std::vector<int64_t> starts;
    for (int64_t a = r0; a < r0 + nr; a = cls.hi[a]) starts.push_back(a);
    return starts;
  }

  // One side of block s (nr×nc; rows r0.., columns c0..): the anchors are the classes of
  // its rows, against its columns (the other side of an off-diagonal block is this on the
  // transposed block, transpose_block). Each class runs side(g)(lo, hi) on its K = hi − lo
  // rows of s in place, beside them the tile's 1/‖v‖, computed here where the rows are hot
  // in cache. Backward (gm: the block's mixed ∂L/∂S, nr×nc, added to): into gm's rows of
  // the class in place.
  template <class Side>
  void side_tiles(const T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc, T* gm,
                  Side&& side) const {
    const std::vector<int64_t> starts = class_starts(r0, nr);
    // a class's work grows as K², and label-sorted runs of large classes left one of two
    // threads waiting ~10% of the Metrix-MS time at B = 4096 (perf: libgomp's spin), so the
    // classes are handed out one at a time (parallel_tasks.h), each worker with its buffer
    parallel_tasks_with<std::vector<T>>(static_cast<int64_t>(starts.size()), [&](int64_t k,
                                                                             std::vector<T>& buf) {
      const int64_t lo = starts[k], hi = cls.hi[lo], n = (hi - lo) * nc;
      buf.resize(n);
      const T* st = s + (lo - r0) * nc;
      mix_inv_norms<T>(st, n, lam, buf.data());
      side(geom(st, buf.data(), nc, lo, c0, gm ? gm + (lo - r0) * nc : nullptr))(lo, hi);
    });
  }
};

// Forward: mixed(g) → kernel(a0, a1) folds the candidates of each class tile of the block's
// two sides, then clean(s, r0, nr, c0, nc) folds the block's clean terms.
template <typename T, class Mixed, class Clean>
void metrix_fold_blocks(const at::Tensor& x, const MixLayout<T>& ml, Mixed&& mixed,
                        Clean&& clean) {
  std::vector<T> st;  // an off-diagonal block transposed: the columns' side
  for_upper_blocks_at(x, ml.cls.bounds, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0,
                                            int64_t nc) {
    const T* sp = s.data_ptr<T>();
    ml.side_tiles(sp, r0, nr, c0, nc, nullptr, mixed);
    if (c0 != r0) {
      st.resize(nr * nc);
      transpose_block(sp, nr, nc, st.data());
      ml.side_tiles(st.data(), c0, nc, r0, nr, nullptr, mixed);
    }
    clean(s, r0, nr, c0, nc);
  });
}

// Backward: dx of the clean and mixed terms. mixed(g) → kernel(a0, a1) adds each class
// tile's mixed terms into g.gm (the block's mixed ∂L/∂S, one buffer reused for every block)
// and ml.gw; clean(s, r0, nr, c0, nc) overwrites s with the clean H = G_IJ + G_JIᵀ. Then
// dx += (H + mixed H) x with the clean op's two products (the mixed H is the buffer, whose
// column-side tiles went in transposed, and on a diagonal block the buffer plus its
// transpose), and the within-class entries: dx_a += Σ_p (G_ap + G_pa) x_p.
template <typename T, class Mixed, class Clean>
at::Tensor metrix_grad_blocks(const at::Tensor& x, const MixLayout<T>& ml, Mixed&& mixed,
                              Clean&& clean) {
  at::Tensor dx = at::zeros_like(x);
  std::vector<T> gm, st, gmt;  // the block's mixed ∂L/∂S; off the diagonal, sᵀ and its own
  for_upper_blocks_at(x, ml.cls.bounds, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0,
                                            int64_t nc) {
    gm.assign(nr * nc, T(0));
    // the mixed terms read s before the clean gradient overwrites it with H
    const T* sp = s.data_ptr<T>();
    ml.side_tiles(sp, r0, nr, c0, nc, gm.data(), mixed);
    if (c0 != r0) {
      st.resize(nr * nc);
      transpose_block(sp, nr, nc, st.data());
      gmt.assign(nr * nc, T(0));
      ml.side_tiles(st.data(), c0, nc, r0, nr, gmt.data(), mixed);
      add_transposed(gm.data(), nr, nc, gmt.data());
    }
    clean(s, r0, nr, c0, nc);
    s.add_(at::from_blob(gm.data(), {nr, nc}, s.options()));
    // a diagonal H is G + Gᵀ (add_sym_block_grad)
    if (c0 == r0) add_transposed(s.data_ptr<T>(), nr, nc, gm.data());
    add_sym_block_grad(dx, x, s, r0, nr, c0, nc);
  });
  const ClassLayout& cls = ml.cls;
  const T* gw = ml.gw;
  const T* xp = x.data_ptr<T>();
  T* dp = dx.data_ptr<T>();
  const int64_t D = x.size(1);
  at::parallel_for(0, x.size(0), 16, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t p = cls.lo[a]; p < cls.hi[a]; ++p) {
        const T w = gw[cls.wc_off[a] + (p - cls.lo[a])] + gw[cls.wc_off[p] + (a - cls.lo[a])];
        if (w != T(0))
          for (int64_t kk = 0; kk < D; ++kk) dp[a * D + kk] += w * xp[p * D + kk];
      }
  });
  return dx;
}

}  // namespace metrix_ops
