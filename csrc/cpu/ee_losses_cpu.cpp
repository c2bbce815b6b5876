// The negative side of the Embedding Expansion losses that score EVERY (anchor, negative
// point) pair (MultiSimilarity, LiftedStructure, NPairs) on the CPU: per original anchor i
//
//     lse_i = log Σ_{q ∈ Q_i} exp(scale · m̂(i, q) + offset),
//     m̂(i, q) = ŝ(i, q) = max_{a ∈ A_i} s(a, q)            (cosine), or
//             = d̂(i, q) = safe_sqrt(2 − 2 ŝ(i, q))          (L2 of normalised points),
//
// −inf where i has no term. Q_i: the originals of another class allowed by neg_mask and every
// synthetic point of another class; A_i: x_i, then the n points of each segment with i as an
// endpoint (reference/expansion_mining.py; ties to the earliest a, as its strict improvement).
// The losses combine lse_i with their clean terms in PyTorch (fused/ee_losses.py). The same
// sweep serves TripletMarginLoss "all" (ee_triplet_*, below): per (i, q) a loop over i's
// positives' clean metrics instead of an exp.
//
// Streaming: rows in slot (label-sorted) order, cut into chunks of whole classes. For a chunk
// pair (C1 anchors, C2 negatives) one product U = X̂_C1 X̂_C2ᵀ; C2's points (its originals, then
// its segments' points) are visited in column tiles: H[r, q] = μ_q U[r, q_u] + (1−μ_q) U[r, q_w]
// (nr × tile), and s(a, q) = (λ_a H[a_u, q] + (1−λ_a) H[a_w, q]) / (‖a‖‖q‖), the reference's
// association (reference/expansion_points.py), a couple of FMAs per (a, q); a segment's
// points, on both its anchors' sides, are scanned once per tile (tile_closest). Memory
// O(B·D + S·n + chunk² + chunk·tile), never B×B nor B×P.
//
// Backward recomputes ŝ and its argmax instead of keeping them from the forward: the argmax
// table is B×P (P = B + n·S; B = 4096, n = 8, 4 per class: 4096 × 53k int32 ≈ 870 MB), the
// memory the op exists to avoid, while recomputing costs one more forward. Each term's
// gradient w.r.t. ŝ goes to a tile T = ∂L/∂H (rows of the winning a's endpoints; one thread
// per anchor class, so its writes stay in its own rows), to ∂L/∂‖a‖ of the winning synthetic
// anchor-side point, and (from T ⊙ H summed over a column) to ∂L/∂‖q‖; T becomes ∂L/∂U, and
// dX̂ += ∂L/∂U X̂_C2 for C1, ∂L/∂Uᵀ X̂_C1 for C2 (block products, in a fixed order). The norms'
// gradients reach the within-class Gram entries g_uu, g_uw, g_wu, g_ww of their segments.
// Deterministic for a given thread count: no atomic accumulation, every accumulator has one
// writer (tasks are handed out by an atomic counter, parallel_tasks.h, but each writes only
// its own outputs).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/expansion.h"
#include "cpu/ee_closest.h"
#include "cpu/ee_layout.h"
#include "cpu/op_checks.h"
#include "cpu/parallel_tasks.h"
#include "cpu/row_tiles.h"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

// A point as one side of the closed form: endpoints (local rows of its chunk), weights and
// norm; pid: its synthetic index e·n + k − 1, or −1 for an original.
template <typename T>
struct EePt {
  int64_t u, w;
  T lam, mu, norm;
  int64_t pid;
};

template <typename T>
struct EeOp {
  const EeLayout& L;
  const at::Tensor& xo;  // unit rows in slot order
  const bool* amask;     // per row: compute this anchor
  const bool* nmask;     // per row: this original may be a negative
  bool l2;
  T scale, offset;
  int64_t chunk, tile;
  std::vector<T> sq, nrm;  // per synthetic point: ‖v‖² and the clamped norm
  EeClosestFn<T> seg_kernel = ee_closest<T>();
  EeCombineFn<T> combine_kernel = ee_combine<T>();

  int64_t rows0(int64_t t) const { return L.cstart[L.chunk_cls[t]]; }
  int64_t rows(int64_t t) const { return L.cstart[L.chunk_cls[t + 1]] - rows0(t); }
  int64_t nchunks() const { return int64_t(L.chunk_cls.size()) - 1; }

  // the synthetic points' norms from each chunk's own Gram block
  void norms() {
    const int64_t n = L.n;
    sq.assign(L.S * n, T(0));
    nrm.assign(L.S * n, T(1));
    for (int64_t t = 0; t < nchunks(); ++t) {
      const int64_t r0 = rows0(t), nr = rows(t);
      at::Tensor xc = xo.narrow(0, r0, nr);
      at::Tensor G = at::mm(xc, xc.t()).contiguous();
      const T* g = G.data_ptr<T>();
      for (int64_t c = L.chunk_cls[t]; c < L.chunk_cls[t + 1]; ++c)
        for (int64_t e : L.class_segs[c]) {
          const int64_t u = L.slot[L.si[e]] - r0, w = L.slot[L.sj[e]] - r0;
          for (int64_t k = 0; k < n; ++k) {
            const T lam = ee_lambda<T>(k + 1, n);
            const T v = ee_point_sq(lam, g[u * nr + u], g[u * nr + w], g[w * nr + u],
                                    g[w * nr + w]);
            const T tiny = std::numeric_limits<T>::min();
            sq[e * n + k] = v;
            nrm[e * n + k] = std::sqrt(v < tiny ? tiny : v);  // NaN stays NaN
          }
        }
    }
  }

  // C2's points: its originals (slot order), then its classes' segments' points
  std::vector<EePt<T>> points_of(int64_t t, std::vector<int64_t>& pcls,
                                 std::vector<char>& pok) const {
    const int64_t r0 = rows0(t), nr = rows(t), n = L.n;
    std::vector<EePt<T>> pts;
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = L.order[r0 + r];
      pts.push_back({r, r, T(1), T(0), T(1), -1});
      pcls.push_back(L.cls[i]);
      pok.push_back(nmask[i]);
    }
    for (int64_t c = L.chunk_cls[t]; c < L.chunk_cls[t + 1]; ++c)
      for (int64_t e : L.class_segs[c])
        for (int64_t k = 0; k < n; ++k) {
          const T lam = ee_lambda<T>(k + 1, n);
          pts.push_back({L.slot[L.si[e]] - r0, L.slot[L.sj[e]] - r0, lam, T(1) - lam,
                         nrm[e * n + k], e * n + k});
          pcls.push_back(c);
          pok.push_back(1);
        }
    return pts;
  }

  // A_i for the anchor at local row r of chunk starting at slot r0
  void side_of(int64_t r, int64_t r0, std::vector<EePt<T>>& side) const {
    const int64_t n = L.n, i = L.order[r0 + r];
    side.clear();
    side.push_back({r, r, T(1), T(0), T(1), -1});
    for (int64_t e : L.of_anchor[i])
      for (int64_t k = 0; k < n; ++k) {
        const T lam = ee_lambda<T>(k + 1, n);
        side.push_back({L.slot[L.si[e]] - r0, L.slot[L.sj[e]] - r0, lam, T(1) - lam,
                        nrm[e * n + k], e * n + k});
      }
  }

  // H tile: nr × nt, H[r, q] = μ_q U[r, q_u] + (1 − μ_q) U[r, q_w] (originals: U[r, q])
  void h_tile(const T* U, int64_t nr, int64_t nc, const EePt<T>* q, int64_t nt, T* H) const {
    at::parallel_for(0, nr, row_grain(nt), [&](int64_t a0, int64_t a1) {
      for (int64_t r = a0; r < a1; ++r) {
        const T* u = U + r * nc;
        T* h = H + r * nt;
        for (int64_t c = 0; c < nt; ++c)
          h[c] = q[c].pid < 0 ? u[q[c].u] : q[c].lam * u[q[c].u] + q[c].mu * u[q[c].w];
      }
    });
  }

  // One thread's buffers for a segment's points in the kernel's layout.
  struct SideRows {
    std::vector<const T*> hu, hw;
    std::vector<T> lam, mu, norm;
  };

  // ŝ(i, q) and the winning index into side_of(i) (as T: one vector width with best) over the
  // tile's columns for every anchor of chunk t1 with want(i), into its row of best and arg
  // (nr × nt). The work the two anchors of a segment share is done once (ee_closest.h): per
  // class and block of columns, each of the class's segments' best point (seg_kernel), then
  // each of its anchors' combination of x_i and its segments' bests (combine_kernel), about
  // half the evaluations of s(a, q) (one division each) of a scan over each A_i. A task is a
  // class and a block of columns narrow enough that its table of segment bests stays in cache
  // (kSegTable entries; a large class gets several blocks).
  static constexpr int64_t kSegTable = int64_t(1) << 14;
  template <class Want>
  void tile_closest(int64_t t1, const T* H, int64_t nt, const T* qn, Want&& want, T* best,
                    T* arg) const {
    const int64_t r0 = rows0(t1), n = L.n;
    struct Task {
      int64_t c, q0, w;
    };
    std::vector<Task> tasks;
    for (int64_t c = L.chunk_cls[t1]; c < L.chunk_cls[t1 + 1]; ++c) {
      const int64_t ns = int64_t(L.class_segs[c].size());
      const int64_t w = ns == 0 ? nt : std::min(nt, std::max<int64_t>(16, kSegTable / ns));
      for (int64_t q0 = 0; q0 < nt; q0 += w) tasks.push_back({c, q0, std::min(w, nt - q0)});
    }
    // largest first, handed out one at a time: a class's work grows as its size squared
    std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
      return L.class_segs[a.c].size() * a.w > L.class_segs[b.c].size() * b.w;
    });
    parallel_tasks(int64_t(tasks.size()), [&](int64_t k) {
      SideRows sr;
      sr.hu.resize(n), sr.hw.resize(n), sr.lam.resize(n), sr.mu.resize(n), sr.norm.resize(n);
      std::vector<T> M, K, base;  // M, K: a row per segment of the class (its seg_rank)
      std::vector<const T*> mp, kp;
      const Task tk = tasks[k];
      const std::vector<int64_t>& segs = L.class_segs[tk.c];
      const int64_t ns = int64_t(segs.size());
      M.resize(ns * tk.w), K.resize(ns * tk.w);
      for (int64_t g = 0; g < ns; ++g) {
        const int64_t e = segs[g];
        const int64_t u = L.slot[L.si[e]] - r0, v = L.slot[L.sj[e]] - r0;
        for (int64_t t = 0; t < n; ++t) {
          const T lam = ee_lambda<T>(t + 1, n);
          sr.hu[t] = H + u * nt + tk.q0, sr.hw[t] = H + v * nt + tk.q0;
          sr.lam[t] = lam, sr.mu[t] = T(1) - lam, sr.norm[t] = nrm[e * n + t];
        }
        seg_kernel({sr.hu.data(), sr.hw.data(), sr.lam.data(), sr.mu.data(), sr.norm.data(),
                    n},
                   qn + tk.q0, tk.w, M.data() + g * tk.w, K.data() + g * tk.w);
      }
      for (int64_t s = L.cstart[tk.c]; s < L.cstart[tk.c + 1]; ++s) {
        const int64_t r = s - r0, i = L.order[s];
        if (!want(i)) continue;
        mp.clear(), kp.clear(), base.clear();
        for (const int64_t e : L.of_anchor[i]) {
          const int64_t g = L.seg_rank[e];
          mp.push_back(M.data() + g * tk.w);
          kp.push_back(K.data() + g * tk.w);
          base.push_back(T(1 + int64_t(base.size()) * n));
        }
        combine_kernel(H + r * nt + tk.q0,
                       {mp.data(), kp.data(), base.data(), int64_t(mp.size())}, qn + tk.q0,
                       tk.w, best + r * nt + tk.q0, arg + r * nt + tk.q0);
      }
    });
  }

  T metric(T s) const { return l2 ? ee_safe_sqrt(T(2) - T(2) * s) : s; }
  // ∂m̂/∂ŝ: 1, or −1/d̂ (0 where safe_sqrt is flat)
  T dmetric(T m) const { return l2 ? (m > T(0) ? T(-1) / m : T(0)) : T(1); }

  // Forward: for every chunk pair and column tile, visit(i, ci, best, pcls, pok, nt) for each
  // anchor i of amask (ŝ(i, q) of the tile's columns in best; a column is a term of i where
  // pcls[q] != ci and pok[q]). Anchors run in parallel: visit writes only anchor i's state.
  template <class Visit>
  void forward_sweep(Visit&& visit) {
    auto want = [&](int64_t i) { return amask[i]; };
    for (int64_t t1 = 0; t1 < nchunks(); ++t1) {
      const int64_t r0 = rows0(t1), nr = rows(t1);
      for (int64_t t2 = 0; t2 < nchunks(); ++t2) {
        const int64_t c0 = rows0(t2), nc = rows(t2);
        at::Tensor U = at::mm(xo.narrow(0, r0, nr), xo.narrow(0, c0, nc).t()).contiguous();
        std::vector<int64_t> pcls;
        std::vector<char> pok;
        const auto pts = points_of(t2, pcls, pok);
        const int64_t P = int64_t(pts.size()), tw = std::min(tile, P);
        std::vector<T> H(nr * tw), best(nr * tw), arg(nr * tw);
        for (int64_t q0 = 0; q0 < P; q0 += tile) {
          const int64_t nt = std::min(tile, P - q0);
          h_tile(U.data_ptr<T>(), nr, nc, pts.data() + q0, nt, H.data());
          std::vector<T> qn(nt);
          for (int64_t c = 0; c < nt; ++c) qn[c] = pts[q0 + c].norm;
          tile_closest(t1, H.data(), nt, qn.data(), want, best.data(), arg.data());
          at::parallel_for(0, nr, 1, [&](int64_t a0, int64_t a1) {
            for (int64_t r = a0; r < a1; ++r) {
              const int64_t i = L.order[r0 + r];
              if (!amask[i]) continue;
              visit(i, L.cls[i], best.data() + r * nt, pcls.data() + q0, pok.data() + q0, nt);
            }
          });
        }
      }
    }
  }

  // Backward: ∂L/∂X̂ in slot order into dxo, given weights(i, ci, ŝ, pcls, pok, nt, w), which
  // fills w[q] = ∂L/∂ŝ(i, q) for the tile's columns (a term where pcls[q] != ci and pok[q];
  // 0 elsewhere) of an anchor with active(i); a whole row at once, so that a loss can take
  // its exps as one vectorised pass. weights runs on one thread per anchor class: it may
  // write per-anchor state of i. See the file comment for the routing.
  template <class Active, class Weights>
  void backward_sweep(at::Tensor& dxo, Active&& active, Weights&& weights) {
    const int64_t n = L.n, D = xo.size(1);
    std::vector<T> dnorm(L.S * n, T(0));  // ∂L/∂‖p‖ per synthetic point
    auto want = [&](int64_t i) { return amask[i] && active(i); };
    for (int64_t t1 = 0; t1 < nchunks(); ++t1) {
      const int64_t r0 = rows0(t1), nr = rows(t1);
      const int64_t k0 = L.chunk_cls[t1], k1 = L.chunk_cls[t1 + 1];
      for (int64_t t2 = 0; t2 < nchunks(); ++t2) {
        const int64_t c0 = rows0(t2), nc = rows(t2);
        at::Tensor U = at::mm(xo.narrow(0, r0, nr), xo.narrow(0, c0, nc).t()).contiguous();
        at::Tensor dU = at::zeros_like(U);
        std::vector<int64_t> pcls;
        std::vector<char> pok;
        const auto pts = points_of(t2, pcls, pok);
        const int64_t P = int64_t(pts.size()), tw = std::min(tile, P);
        std::vector<T> H(nr * tw), Tg(nr * tw), best(nr * tw), arg(nr * tw);
        T* du = dU.data_ptr<T>();
        for (int64_t q0 = 0; q0 < P; q0 += tile) {
          const int64_t nt = std::min(tile, P - q0);
          h_tile(U.data_ptr<T>(), nr, nc, pts.data() + q0, nt, H.data());
          std::fill(Tg.begin(), Tg.begin() + nr * nt, T(0));
          std::vector<T> qn(nt);
          for (int64_t c = 0; c < nt; ++c) qn[c] = pts[q0 + c].norm;
          // 1) ŝ and its argmax for the chunk's anchors, then per anchor class (its rows of Tg
          // and its segments' dnorm are its own)
          tile_closest(t1, H.data(), nt, qn.data(), want, best.data(), arg.data());
          parallel_tasks(k1 - k0, [&](int64_t kc) {
            const int64_t c = k0 + kc;
            std::vector<EePt<T>> side;
            std::vector<T> w(nt);
            for (int64_t s = L.cstart[c]; s < L.cstart[c + 1]; ++s) {
              const int64_t r = s - r0, i = L.order[s];
              if (!want(i)) continue;
              side_of(r, r0, side);
              const T* br = best.data() + r * nt;
              const T* ar = arg.data() + r * nt;
              weights(i, c, br, pcls.data() + q0, pok.data() + q0, nt, w.data());
              for (int64_t q = 0; q < nt; ++q) {
                const T ws = w[q];
                if (ws == T(0)) continue;
                const T sh = br[q];
                const EePt<T>& a = side[int64_t(ar[q])];
                const T wi = ws / (a.norm * qn[q]);
                Tg[a.u * nt + q] += a.lam * wi;
                if (a.pid >= 0) {
                  Tg[a.w * nt + q] += a.mu * wi;
                  dnorm[a.pid] -= ws * sh / a.norm;
                }
              }
            }
          });
          // 2) ∂L/∂‖q‖ = −(1/‖q‖) Σ_r Tg[r, q] H[r, q], a block of columns per task, rows
          // outer so that both tiles are read along their rows (the sum per column is still
          // in row order)
          at::parallel_for(0, nt, 64, [&](int64_t a0, int64_t a1) {
            std::vector<T> acc(a1 - a0, T(0));
            for (int64_t r = 0; r < nr; ++r) {
              const T* tr = Tg.data() + r * nt;
              const T* hr = H.data() + r * nt;
              for (int64_t q = a0; q < a1; ++q) acc[q - a0] += tr[q] * hr[q];
            }
            for (int64_t q = a0; q < a1; ++q)
              if (pts[q0 + q].pid >= 0) dnorm[pts[q0 + q].pid] -= acc[q - a0] / qn[q];
          });
          // 3) Tg -> ∂L/∂U through H's two gathers, one row per task
          at::parallel_for(0, nr, row_grain(nt), [&](int64_t a0, int64_t a1) {
            for (int64_t r = a0; r < a1; ++r) {
              const T* tr = Tg.data() + r * nt;
              T* d = du + r * nc;
              for (int64_t q = 0; q < nt; ++q) {
                const EePt<T>& p = pts[q0 + q];
                if (p.pid < 0) {
                  d[p.u] += tr[q];
                } else {
                  d[p.u] += p.lam * tr[q];
                  d[p.w] += p.mu * tr[q];
                }
              }
            }
          });
        }
        // dX̂ = ∂L/∂G X̂ + ∂L/∂Gᵀ X̂ over this block of G
        at::Tensor d1 = dxo.narrow(0, r0, nr), d2 = dxo.narrow(0, c0, nc);
        d1.addmm_(dU, xo.narrow(0, c0, nc));
        d2.addmm_(dU.t(), xo.narrow(0, r0, nr));
      }
    }
    // the synthetic points' norms: ‖p‖² = λ(λ g_uu + μ g_uw) + μ(λ g_wu + μ g_ww), clamped
    T* dx = dxo.data_ptr<T>();
    const T* xp = xo.data_ptr<T>();
    at::parallel_for(0, L.C, 1, [&](int64_t a0, int64_t a1) {
      for (int64_t c = a0; c < a1; ++c)
        for (int64_t e : L.class_segs[c]) {
          T cuu = 0, cuw = 0, cww = 0;
          for (int64_t k = 0; k < n; ++k) {
            const int64_t p = e * n + k;
            if (!(sq[p] >= std::numeric_limits<T>::min()) || dnorm[p] == T(0)) continue;
            const T lam = ee_lambda<T>(k + 1, n), mu = T(1) - lam;
            const T dsq = dnorm[p] / (T(2) * nrm[p]);
            cuu += T(2) * lam * lam * dsq;
            cuw += T(2) * lam * mu * dsq;
            cww += T(2) * mu * mu * dsq;
          }
          const int64_t u = L.slot[L.si[e]], w = L.slot[L.sj[e]];
          T* du = dx + u * D;
          T* dw = dx + w * D;
          const T* xu = xp + u * D;
          const T* xw = xp + w * D;
          for (int64_t d = 0; d < D; ++d) {
            du[d] += cuu * xu[d] + cuw * xw[d];
            dw[d] += cuw * xu[d] + cww * xw[d];
          }
        }
    });
  }
};

void check_ee_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& seg_i,
                     const at::Tensor& seg_j, const at::Tensor& anchor_mask,
                     const at::Tensor& neg_mask, int64_t n, int64_t chunk) {
  check_ee_args(x, labels, seg_i, seg_j, anchor_mask, neg_mask, n, chunk);
  for (const at::Tensor* t : {&x, &labels, &seg_i, &seg_j, &anchor_mask, &neg_mask})
    TORCH_CHECK(t->device().is_cpu(), "ee ops: all inputs must be CPU tensors");
}

at::Tensor slot_order(const EeLayout& L, const at::Tensor& labels) {
  return at::tensor(L.order, labels.options());
}

// rows back from slot order
at::Tensor unslot(const EeLayout& L, const at::Tensor& labels, const at::Tensor& xo) {
  at::Tensor dx = at::empty_like(xo);
  dx.index_copy_(0, slot_order(L, labels), xo);
  return dx;
}

}  // namespace

at::Tensor ee_neg_lse_fwd_cpu(const at::Tensor& x_, const at::Tensor& labels_,
                              const at::Tensor& seg_i_, const at::Tensor& seg_j_,
                              const at::Tensor& anchor_mask_, const at::Tensor& neg_mask_,
                              int64_t n, bool l2, double scale, double offset, int64_t chunk) {
  check_ee_inputs(x_, labels_, seg_i_, seg_j_, anchor_mask_, neg_mask_, n, chunk);
  auto x = x_.contiguous(), labels = labels_.contiguous();
  auto amask = anchor_mask_.contiguous(), nmask = neg_mask_.contiguous();
  const EeLayout L = make_layout(labels, seg_i_.contiguous(), seg_j_.contiguous(), n, chunk);
  const int64_t B = L.B;
  at::Tensor out = at::full({B}, -std::numeric_limits<double>::infinity(), x.options());
  if (B == 0) return out;
  at::Tensor xo = x.index_select(0, slot_order(L, labels));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_neg_lse_fwd_cpu", [&] {
    using T = scalar_t;
    EeOp<T> op{L, xo, amask.data_ptr<bool>(), nmask.data_ptr<bool>(), l2, T(scale),
               T(offset), chunk, std::max<int64_t>(4 * chunk, 64)};
    op.norms();
    const T ninf = -std::numeric_limits<T>::infinity();
    std::vector<T> mx(B, ninf), sm(B, T(0));  // online log-sum-exp per anchor
    op.forward_sweep([&](int64_t i, int64_t ci, T* best, const int64_t* pcls, const char* pok,
                         int64_t nt) {
      T tmax = ninf;
      for (int64_t c = 0; c < nt; ++c) {
        if (pcls[c] == ci || !pok[c]) {
          best[c] = ninf;  // not a term
          continue;
        }
        best[c] = op.scale * op.metric(best[c]) + op.offset;
        tmax = std::max(tmax, best[c]);
      }
      if (tmax == ninf) return;
      const T m = std::max(mx[i], tmax);
      for (int64_t c = 0; c < nt; ++c) best[c] -= m;  // −inf stays −inf: e^x = 0
      exp_row(best, nt);
      T acc = sm[i] * std::exp(mx[i] - m);
      for (int64_t c = 0; c < nt; ++c) acc += best[c];
      mx[i] = m, sm[i] = acc;
    });
    T* o = out.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i)
      if (mx[i] != ninf) o[i] = mx[i] + std::log(sm[i]);
  });
  return out;
}

at::Tensor ee_neg_lse_bwd_cpu(const at::Tensor& grad_, const at::Tensor& lse_,
                              const at::Tensor& x_, const at::Tensor& labels_,
                              const at::Tensor& seg_i_, const at::Tensor& seg_j_,
                              const at::Tensor& anchor_mask_, const at::Tensor& neg_mask_,
                              int64_t n, bool l2, double scale, double offset, int64_t chunk) {
  check_ee_inputs(x_, labels_, seg_i_, seg_j_, anchor_mask_, neg_mask_, n, chunk);
  check_vec(grad_, x_.size(0), "grad");
  check_vec(lse_, x_.size(0), "lse");
  auto x = x_.contiguous(), labels = labels_.contiguous();
  auto grad = grad_.to(x.scalar_type()).contiguous(), lse = lse_.to(x.scalar_type()).contiguous();
  auto amask = anchor_mask_.contiguous(), nmask = neg_mask_.contiguous();
  const EeLayout L = make_layout(labels, seg_i_.contiguous(), seg_j_.contiguous(), n, chunk);
  if (L.B == 0) return at::zeros_like(x);
  at::Tensor xo = x.index_select(0, slot_order(L, labels));
  at::Tensor dxo = at::zeros_like(xo);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_neg_lse_bwd_cpu", [&] {
    using T = scalar_t;
    EeOp<T> op{L, xo, amask.data_ptr<bool>(), nmask.data_ptr<bool>(), l2, T(scale),
               T(offset), chunk, std::max<int64_t>(4 * chunk, 64)};
    op.norms();
    const T* g = grad.data_ptr<T>();
    const T* ls = lse.data_ptr<T>();
    op.backward_sweep(
        dxo, [&](int64_t i) { return g[i] != T(0) && ls[i] != -std::numeric_limits<T>::infinity(); },
        [&](int64_t i, int64_t ci, const T* sh, const int64_t* pcls, const char* pok,
            int64_t nt, T* w) {
          // g · e^{scale·m̂ + offset − lse} · scale · ∂m̂/∂ŝ, the exps as one pass (e^−inf = 0)
          const T ninf = -std::numeric_limits<T>::infinity();
          for (int64_t q = 0; q < nt; ++q)
            w[q] = pcls[q] == ci || !pok[q] ? ninf : op.scale * op.metric(sh[q]) + op.offset - ls[i];
          exp_row(w, nt);
          const T gs = g[i] * op.scale;
          for (int64_t q = 0; q < nt; ++q)
            if (w[q] != T(0)) w[q] *= gs * op.dmetric(op.metric(sh[q]));
        });
  });
  return unslot(L, labels, dxo);
}

// TripletMarginLoss "all" with EE: per anchor i, over its positives p (pos: their clean metric,
// anchor-major CSR in index order, each anchor's class members but itself in index order)
// and every negative point q, the terms f(v) with v = margin(pos_ip, m̂(i, q)) + margin and f
// relu or (smooth) softplus (ee_trip_f, common/expansion.h). Returns (Σ f, #f > 0,
// #triplets) per anchor; no triplet list.

std::tuple<at::Tensor, at::Tensor, at::Tensor> ee_triplet_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& labels_, const at::Tensor& seg_i_,
    const at::Tensor& seg_j_, const at::Tensor& pos_, int64_t n, bool l2, double margin,
    bool smooth, int64_t chunk) {
  auto all = at::ones({x_.size(0)}, labels_.options().dtype(at::kBool));
  check_ee_inputs(x_, labels_, seg_i_, seg_j_, all, all, n, chunk);
  auto x = x_.contiguous(), labels = labels_.contiguous(), pos = pos_.contiguous();
  const EeLayout L = make_layout(labels, seg_i_.contiguous(), seg_j_.contiguous(), n, chunk);
  check_pos(L, pos, x);
  const int64_t B = L.B;
  at::Tensor sums = at::zeros({B}, x.options());
  at::Tensor nonzero = at::zeros({B}, labels.options()), count = at::zeros({B}, labels.options());
  if (B == 0) return {sums, nonzero, count};
  const auto off = pos_offsets(L);
  at::Tensor xo = x.index_select(0, slot_order(L, labels));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_triplet_fwd_cpu", [&] {
    using T = scalar_t;
    EeOp<T> op{L, xo, all.data_ptr<bool>(), all.data_ptr<bool>(), l2, T(1), T(0), chunk,
               std::max<int64_t>(4 * chunk, 64)};
    op.norms();
    const T* pv = pos.data_ptr<T>();
    const T m = T(margin);
    T* su = sums.data_ptr<T>();
    int64_t* nz = nonzero.data_ptr<int64_t>();
    int64_t* ct = count.data_ptr<int64_t>();
    op.forward_sweep([&](int64_t i, int64_t ci, T* best, const int64_t* pcls, const char*,
                         int64_t nt) {
      const T* p = pv + off[i];
      const int64_t np = off[i + 1] - off[i];
      if (np == 0) return;
      T acc = 0;
      int64_t k = 0, tot = 0;
      for (int64_t c = 0; c < nt; ++c) {
        if (pcls[c] == ci) continue;
        const T mh = op.metric(best[c]);
        ++tot;
        for (int64_t j = 0; j < np; ++j) {
          const T f = ee_trip_f((l2 ? p[j] - mh : mh - p[j]) + m, smooth);
          acc += f;
          k += f > T(0);
        }
      }
      su[i] += acc, nz[i] += k, ct[i] += tot * np;
    });
  });
  return {sums, nonzero, count};
}

std::tuple<at::Tensor, at::Tensor> ee_triplet_bwd_cpu(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& labels_,
    const at::Tensor& seg_i_, const at::Tensor& seg_j_, const at::Tensor& pos_, int64_t n,
    bool l2, double margin, bool smooth, int64_t chunk) {
  auto all = at::ones({x_.size(0)}, labels_.options().dtype(at::kBool));
  check_ee_inputs(x_, labels_, seg_i_, seg_j_, all, all, n, chunk);
  check_vec(grad_, x_.size(0), "grad");
  auto x = x_.contiguous(), labels = labels_.contiguous(), pos = pos_.contiguous();
  auto grad = grad_.to(x.scalar_type()).contiguous();
  const EeLayout L = make_layout(labels, seg_i_.contiguous(), seg_j_.contiguous(), n, chunk);
  check_pos(L, pos, x);
  at::Tensor dpos = at::zeros_like(pos);
  if (L.B == 0) return {at::zeros_like(x), dpos};
  const auto off = pos_offsets(L);
  at::Tensor xo = x.index_select(0, slot_order(L, labels));
  at::Tensor dxo = at::zeros_like(xo);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_triplet_bwd_cpu", [&] {
    using T = scalar_t;
    EeOp<T> op{L, xo, all.data_ptr<bool>(), all.data_ptr<bool>(), l2, T(1), T(0), chunk,
               std::max<int64_t>(4 * chunk, 64)};
    op.norms();
    const T* g = grad.data_ptr<T>();
    const T* pv = pos.data_ptr<T>();
    T* dp = dpos.data_ptr<T>();  // anchor i's entries: written by its class's thread only
    const T m = T(margin);
    op.backward_sweep(
        dxo, [&](int64_t i) { return g[i] != T(0) && off[i + 1] > off[i]; },
        [&](int64_t i, int64_t ci, const T* sh, const int64_t* pcls, const char* pok,
            int64_t nt, T* w) {
          for (int64_t q = 0; q < nt; ++q) {
            w[q] = T(0);
            if (pcls[q] == ci || !pok[q]) continue;
            const T mh = op.metric(sh[q]);
            T sum = 0;
            for (int64_t j = off[i]; j < off[i + 1]; ++j) {
              const T df = g[i] * ee_trip_df((l2 ? pv[j] - mh : mh - pv[j]) + m, smooth);
              sum += df;
              dp[j] += l2 ? df : -df;
            }
            w[q] = (l2 ? -sum : sum) * op.dmetric(mh);
          }
        });
  });
  return {unslot(L, labels, dxo), dpos};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Embedding Expansion, the negative side of MS / lifted / N-pair (ee_losses_cpu.cpp): per
  // anchor log Σ_{q ∈ Q_i} exp(scale · m̂(i, q) + offset) over unit rows x, m̂ the hard-
  // negative-pair cosine ŝ (l2=False) or L2 distance d̂ (l2=True); −inf without a term.
  m.def("ee_neg_lse_fwd(Tensor x, Tensor labels, Tensor seg_i, Tensor seg_j, Tensor anchor_mask, "
        "Tensor neg_mask, int n_points, bool l2, float scale, float offset, int chunk) -> Tensor",
        METRIX_HOST_READS);
  m.def("ee_neg_lse_bwd(Tensor grad, Tensor lse, Tensor x, Tensor labels, Tensor seg_i, "
        "Tensor seg_j, Tensor anchor_mask, Tensor neg_mask, int n_points, bool l2, float scale, "
        "float offset, int chunk) -> Tensor",
        METRIX_HOST_READS);
  // TripletMarginLoss "all" with EE: per anchor (Σ f(v), #f > 0, #triplets) over its positives
  // (pos: their clean metric, anchor-major) and every negative point; v = margin(pos, m̂) + m
  m.def("ee_triplet_fwd(Tensor x, Tensor labels, Tensor seg_i, Tensor seg_j, Tensor pos, "
        "int n_points, bool l2, float margin, bool smooth, int chunk) -> (Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("ee_triplet_bwd(Tensor grad, Tensor x, Tensor labels, Tensor seg_i, Tensor seg_j, "
        "Tensor pos, int n_points, bool l2, float margin, bool smooth, int chunk) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ee_neg_lse_fwd", &ee_neg_lse_fwd_cpu);
  m.impl("ee_neg_lse_bwd", &ee_neg_lse_bwd_cpu);
  m.impl("ee_triplet_fwd", &ee_triplet_fwd_cpu);
  m.impl("ee_triplet_bwd", &ee_triplet_bwd_cpu);
}

}  // namespace metrix_ops
