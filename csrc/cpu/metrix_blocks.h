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
// those of J against I through sᵀ, one class at a time (MixLayout::side_tiles): a class's
// K rows of sᵀ are gathered into a small tile (the mixed terms read two rows of S per
// candidate, which a column walk would make strided), and the 1/‖v‖ of the tile are computed
// beside it, so no whole-block pass is added to the clean loss's. The within-class cosines
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

#include "cpu/metrix_mix_kernels.h"
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

// 1/‖mix(row, column)‖ for n entries of S: 1/sqrt(max(‖v‖², ε²)) is 1/max(‖v‖, ε) for
// ‖v‖² ≥ 0 (NaN passes). SSE2's square root and division where there are (both correctly
// rounded, as ATen's rsqrt; a scalar std::sqrt does not vectorise, for errno), else scalar.
template <typename T>
void mix_inv_norms(const T* s, int64_t n, T lam, T* inv) {
  const T q0 = lam * lam + (1 - lam) * (1 - lam), q1 = 2 * lam * (1 - lam);
  const T lo = T(kMixEps * kMixEps);
  int64_t k = 0;
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

// The same for a whole block, as a tensor (the interface before the class tiles below)
template <typename T>
at::Tensor mix_inv_norms(const at::Tensor& s, T lam) {
  const double l = lam, q0 = l * l + (1 - l) * (1 - l), q1 = 2 * l * (1 - l);
  return (s * q1 + q0).clamp_min_(kMixEps * kMixEps).rsqrt_();
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
  MixGeom<T> geom(const at::Tensor& s, const at::Tensor& inv, int64_t r0, int64_t c0,
                  T* gm) const {
    return geom(s.data_ptr<T>(), inv.data_ptr<T>(), s.size(1), r0, c0, gm);
  }

  // the first row of each class among the rows [r0, r0 + nr)
  std::vector<int64_t> class_starts(int64_t r0, int64_t nr) const {
    std::vector<int64_t> starts;
    for (int64_t a = r0; a < r0 + nr; a = cls.hi[a]) starts.push_back(a);
    return starts;
  }

  // fn(a0, a1) for each class among the rows [r0, r0 + nr), in parallel
  template <class Fn>
  void for_classes(int64_t r0, int64_t nr, Fn&& fn) const {
    const std::vector<int64_t> starts = class_starts(r0, nr);
    at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) fn(starts[k], cls.hi[starts[k]]);
    });
  }

  // One side of block s (nr×nc; rows r0.., columns c0..): with rows, the anchors are the
  // classes of the rows against the columns; else those of the columns against the rows.
  // Each class runs side(g)(lo, hi) on a tile of its own, g over K = hi − lo rows: on the
  // row side its rows of s in place, on the column side its columns gathered into rows
  // (K·nr values: no transposed copy of the block); beside it the tile's 1/‖v‖, computed
  // here where the tile is hot in cache. Backward (gm: the block's mixed ∂L/∂S, nr×nc, added
  // to): the row side adds into gm's rows in place, the column side into a zeroed tile that
  // is added back down gm's columns.
  template <class Side>
  void side_tiles(const T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc, bool rows, T* gm,
                  Side&& side) const {
    const int64_t o0 = rows ? c0 : r0, no = rows ? nc : nr;  // the negatives' range
    const std::vector<int64_t> starts = rows ? class_starts(r0, nr) : class_starts(c0, nc);
    at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> buf;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t lo = starts[k], hi = cls.hi[lo], K = hi - lo, n = K * no;
        buf.resize(rows ? n : (gm ? 3 : 2) * n);
        T* inv = buf.data();
        const T* st = s + (lo - r0) * nc;
        T* gt = gm ? gm + (lo - r0) * nc : nullptr;
        if (!rows) {
          T* t = inv + n;
          for (int64_t i = 0; i < nr; ++i)
            for (int64_t a = 0; a < K; ++a) t[a * nr + i] = s[i * nc + (lo - c0) + a];
          st = t;
          gt = gm ? t + n : nullptr;
          if (gt) std::fill(gt, gt + n, T(0));
        }
        mix_inv_norms<T>(st, n, lam, inv);
        side(geom(st, inv, no, lo, o0, gt))(lo, hi);
        if (!rows && gt)
          for (int64_t i = 0; i < nr; ++i)
            for (int64_t a = 0; a < K; ++a) gm[i * nc + (lo - c0) + a] += gt[a * nr + i];
      }
    });
  }

  // Both sides of block (r0.., c0..) through side(g) → kernel(a0, a1) over whole-block
  // tensors (the interface before side_tiles): the rows of s, and off the diagonal the rows
  // of sᵀ. Backward (with_grad) gives each side a zeroed ∂L/∂S block to add to and returns
  // them (the second is the first on the diagonal).
  template <class Side>
  std::pair<at::Tensor, at::Tensor> both_sides(const at::Tensor& s, int64_t r0, int64_t nr,
                                               int64_t c0, int64_t nc, bool with_grad,
                                               Side&& side) const {
    auto one = [&](const at::Tensor& st, int64_t rr0, int64_t rnr, int64_t cc0) {
      const at::Tensor inv = mix_inv_norms<T>(st, lam);
      at::Tensor gm = with_grad ? at::zeros_like(st) : at::Tensor();
      const auto kernel = side(geom(st, inv, rr0, cc0, with_grad ? gm.data_ptr<T>() : nullptr));
      for_classes(rr0, rnr, kernel);
      return gm;
    };
    at::Tensor gm = one(s, r0, nr, c0);
    at::Tensor gmt = c0 != r0 ? one(s.t().contiguous(), c0, nc, r0) : gm;
    return {gm, gmt};
  }
};

// Forward: mixed(g) → kernel(a0, a1) folds the candidates of each class tile of the block's
// two sides, then clean(s, r0, nr, c0, nc) folds the block's clean terms.
template <typename T, class Mixed, class Clean>
void metrix_fold_blocks(const at::Tensor& x, const MixLayout<T>& ml, Mixed&& mixed,
                        Clean&& clean) {
  for_upper_blocks_at(x, ml.cls.bounds, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0,
                                            int64_t nc) {
    const T* sp = s.data_ptr<T>();
    ml.side_tiles(sp, r0, nr, c0, nc, /*rows=*/true, nullptr, mixed);
    if (c0 != r0) ml.side_tiles(sp, r0, nr, c0, nc, /*rows=*/false, nullptr, mixed);
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
  std::vector<T> gm;
  for_upper_blocks_at(x, ml.cls.bounds, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0,
                                            int64_t nc) {
    gm.assign(nr * nc, T(0));
    // the mixed terms read s before the clean gradient overwrites it with H
    const T* sp = s.data_ptr<T>();
    ml.side_tiles(sp, r0, nr, c0, nc, /*rows=*/true, gm.data(), mixed);
    if (c0 != r0) ml.side_tiles(sp, r0, nr, c0, nc, /*rows=*/false, gm.data(), mixed);
    clean(s, r0, nr, c0, nc);
    const at::Tensor g = at::from_blob(gm.data(), {nr, nc}, s.options());
    s.add_(g);
    if (c0 == r0) s.add_(g.t());  // a diagonal H is G + Gᵀ (add_sym_block_grad)
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
