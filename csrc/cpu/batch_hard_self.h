// The batch against itself, without synthetic points: per anchor its farthest positive and
// closest negative by cosine (ee_hphn_mine's picks when there is no segment: clean HPHN, or
// EE with n = 0), from half of U = X̂ X̂ᵀ.
//
// Why a separate walk: the EE search needs whole rows of U, so ee_hphn_mine forms them for
// every chunk (B²·D multiply-adds); with no synthetic point each entry serves two anchors
// (U is symmetric), so a chunk of rows I forms only its block row against the slots from its
// own on, I × [r0, B): its rows take their picks from it, and the later slots take their
// negatives from its columns. That halves the product, which is most of the clean loss's
// time (B = 4096, D = 512: the mining's product 59 ms of the loss's 70 on the 2-core VM).
//
// Ties and NaN as the full-row walk (ee_mining_cpu.cpp): the largest (smallest, for the
// positive) cosine, NaN never winning, the lowest original index on ties; an anchor whose
// first candidate (its lowest-index negative, or positive) is NaN keeps that one (the walk
// starts from it and nothing beats NaN). Such a cosine is NaN exactly when one of its two
// unit rows holds a NaN (bounded rows: no inf − inf), which is what is tested.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/ee_closest.h"

namespace metrix_ops {

template <typename T>
struct BatchHardSelf {
  const at::Tensor& xo;                 // B × D unit rows in slot order (classes contiguous)
  const std::vector<int64_t>& order;    // slot -> original index
  const std::vector<int64_t>& cstart;   // slots of class c: [cstart[c], cstart[c + 1])
  const std::vector<int64_t>& first_neg;  // per class, its lowest-index negative (−1: none)
  int64_t chunk;                        // rows per block row (whole classes, at least one)

  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

  // better by value (the larger if `larger`), then by the lower index; NaN never better
  static bool better(T v, int64_t q, T best, int64_t bq, bool larger) {
    return (larger ? v > best : v < best) || (v == best && q < bq);
  }

  // Writes the picks of anchor i as B × 7 rows [p, i, i, k, q, q, k] (k = n + 1: an original;
  // −1 where there is none) into out.
  void run(int64_t k_orig, int64_t* out) const {
    const int64_t B = xo.size(0), D = xo.size(1), C = int64_t(cstart.size()) - 1;
    const T* xp = xo.data_ptr<T>();
    std::vector<T> nv(B, -std::numeric_limits<T>::infinity()), pv(B, std::numeric_limits<T>::infinity());
    std::vector<int64_t> nq(B, kNone), pq(B, kNone);
    std::vector<int64_t> slot_cls(B);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = cstart[c]; s < cstart[c + 1]; ++s) slot_cls[s] = c;
    const auto row_max = ee_row_max<T>();
    for (int64_t c0 = 0; c0 < C;) {
      int64_t c1 = c0 + 1;  // a chunk of whole classes, as ee_hphn_mine's
      while (c1 < C && cstart[c1 + 1] - cstart[c0] <= chunk) ++c1;
      const int64_t r0 = cstart[c0], nr = cstart[c1] - r0, W = B - r0;
      // nr × W: the chunk's rows against the slots [r0, B)
      const at::Tensor U = at::mm(xo.narrow(0, r0, nr), xo.narrow(0, r0, W).t()).contiguous();
      const T* Up = U.data_ptr<T>();
      // rows: positives inside their class, negatives in the rest of [r0, B)
      at::parallel_for(0, nr, 8, [&](int64_t a0, int64_t a1) {
        for (int64_t r = a0; r < a1; ++r) {
          const T* u = Up + r * W;
          const int64_t c = slot_cls[r0 + r], o0 = cstart[c] - r0, o1 = cstart[c + 1] - r0;
          T mx = -std::numeric_limits<T>::infinity();
          int nan = 0;
          row_max(u, o0, &mx, &nan);
          row_max(u + o1, W - o1, &mx, &nan);
          T& bv = nv[r0 + r];
          int64_t& bq = nq[r0 + r];
          if (mx == mx && mx >= bv) {  // the lowest index holding mx (rare: mostly one)
            auto scan = [&](int64_t s0, int64_t s1) {
              for (int64_t s = s0; s < s1; ++s)
                if (u[s] == mx && better(mx, order[r0 + s], bv, bq, true)) bv = mx, bq = order[r0 + s];
            };
            scan(0, o0);
            scan(o1, W);
          }
          for (int64_t s = o0; s < o1; ++s)
            if (s != r && better(u[s], order[r0 + s], pv[r0 + r], pq[r0 + r], false))
              pv[r0 + r] = u[s], pq[r0 + r] = order[r0 + s];
        }
      });
      // columns after the chunk: each slot's negatives among the chunk's rows, first the
      // column maxima over the rows (a vector pass), then the lowest index holding one where
      // it reaches the slot's best so far
      const int64_t cb = 256;
      at::parallel_for(nr, W, cb, [&](int64_t s0, int64_t s1) {
        std::vector<T> cm(s1 - s0, -std::numeric_limits<T>::infinity());
        for (int64_t r = 0; r < nr; ++r) {
          const T* u = Up + r * W + s0;
          for (int64_t s = 0; s < s1 - s0; ++s) cm[s] = u[s] > cm[s] ? u[s] : cm[s];
        }
        for (int64_t s = s0; s < s1; ++s) {
          const T m = cm[s - s0];
          T& bv = nv[r0 + s];
          int64_t& bq = nq[r0 + s];
          if (!(m >= bv)) continue;
          for (int64_t r = 0; r < nr; ++r)
            if (Up[r * W + s] == m && better(m, order[r0 + r], bv, bq, true))
              bv = m, bq = order[r0 + r];
        }
      });
      c0 = c1;
    }
    // NaN rows, and the picks
    std::vector<char> has_nan(B);
    at::parallel_for(0, B, 64, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        bool bad = false;
        for (int64_t d = 0; d < D; ++d) bad |= std::isnan(xp[s * D + d]);
        has_nan[s] = bad;
      }
    });
    std::vector<int64_t> slot(B);
    for (int64_t s = 0; s < B; ++s) slot[order[s]] = s;
    for (int64_t s = 0; s < B; ++s) {
      const int64_t i = order[s], c = slot_cls[s];
      int64_t* oi = out + i * 7;
      // positives: the class's members in index order; the first other than i starts
      const int64_t m0 = cstart[c], m1 = cstart[c + 1];
      const int64_t fp = order[m0] != i ? m0 : m0 + 1;
      if (fp < m1) oi[0] = (has_nan[s] || has_nan[fp] || pq[s] == kNone) ? order[fp] : pq[s];
      const int64_t fn = first_neg[c];
      if (fn < 0) continue;
      const int64_t q = (has_nan[s] || has_nan[slot[fn]] || nq[s] == kNone) ? fn : nq[s];
      oi[1] = oi[2] = i;
      oi[3] = k_orig;
      oi[4] = oi[5] = q;
      oi[6] = k_orig;
    }
  }
};

}  // namespace metrix_ops
