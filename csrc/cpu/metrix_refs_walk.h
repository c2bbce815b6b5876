// The walk of the embedding-level Metrix ops of anchors X against references R (`ref_emb`,
// or a cross-batch memory bank), pairs "pos_neg" or "anchor_neg": the counterpart of
// metrix_blocks.h, feeding the same per-loss kernels (MixGeom sides), so that every loss
// whose in-batch Metrix op has a kernel gets the same term against references.
//
// Anchor a of class c has the candidates mix(p, n, λ), p a reference of class c (not a's own
// slot, when R holds the batch), n a reference of another class:
//
//   s̃ = (λ S_ap + (1−λ) S_an) / ‖v_pn‖,   ‖v_pn‖ from (R Rᵀ)_pn,   S = X Rᵀ,
//
// so a class needs its anchors' rows of S and its positives' rows of R Rᵀ, nothing else.
// Both sets are label-sorted (the Python side sorts them): a class is a run of anchors and a
// run of references. Classes are taken in groups of consecutive classes: the group's
// anchors (one slice of X) then its classes' positives stacked into Q, one product Q Rᵀ (per
// column chunk, below) gives every class its rows (K_a + K_p), and the classes run in
// parallel. The rows are laid out as the in-batch kernels expect a block side that holds a
// class: MixGeom::r0 is the group's first anchor, so an anchor's row of S is its own
// number's, and its positives sit further down as rows that MixGeom::cls_lo/hi give (with
// self_row its own slot among them), set per group. An anchor with no positive mixes itself,
// whose 1/‖v_an‖ comes from its own row of S.
//
// The references' columns go in chunks where a group's rows × M would exceed `group`
// entries (the op's argument): the kernels' per-anchor states merge over column blocks, as
// in the in-batch walk, so memory is three (rows × chunk) tiles whatever the bank's size or
// the classes' (a class of K positives against M references costs K·M candidates per
// anchor, never K·M entries held).
//
// Backward: per chunk the kernels add ∂L/∂S into the chunk's gradient rows (anchors':
// entries (a, n); positives': entries (p, n)), and ∂L/∂s_ap into gw over the chunks; each
// chunk gives dX_g += G_a R_c, and where R needs a gradient dR_c += Gᵀ Q and the positives'
// G_p R_c; gw (s_ap = x_a·r_p) goes to both at the end. With R detached (a memory bank) that
// is one product, not three.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "cpu/metrix_blocks.h"
#include "cpu/ms_blocks.h"
#include "cpu/op_checks.h"
#include "cpu/refs_runs.h"

namespace metrix_ops {

// The arguments every op of the walk takes: unit anchors and references, their labels, each
// anchor's own row of the references (int64, −1: none), and λ.
inline void check_refs_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                              const at::Tensor& ref_labels, const at::Tensor& self, double lam) {
  check_pair_inputs(x, r, labels, ref_labels, 1);
  check_labels_of(self, x.size(0), "self");
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
}

// The runs of the label-sorted anchors and their positives among the label-sorted
// references, and each anchor's MixGeom fields.
struct RefsLayout {
  std::vector<int64_t> run_lo, run_hi, pos_lo, pos_hi;   // per class run
  std::vector<int64_t> self_off;  // per anchor: its own row's place among its positives, or −1
  std::vector<int64_t> cls_lo, cls_hi, self_row, wc_off;  // per anchor: MixGeom's, per group
  int64_t group = 1;  // entries of a group's tiles (rows × M), at least one class
};

// self[a]: a's own row among the sorted references (−1: none)
inline RefsLayout refs_layout(const at::Tensor& labels, const at::Tensor& ref_labels,
                              const at::Tensor& self, int64_t group) {
  TORCH_CHECK(group > 0, "group must be > 0, got ", group);
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t* yr = ref_labels.data_ptr<int64_t>();
  const int64_t* own = self.data_ptr<int64_t>();
  const int64_t B = labels.size(0), M = ref_labels.size(0);
  RefsLayout L;
  L.group = group;
  for (auto* v : {&L.self_off, &L.cls_lo, &L.cls_hi, &L.self_row, &L.wc_off}) v->resize(B);
  for (const ClassRun& u : class_runs(y, B, yr, M, own)) {
    for (int64_t a = u.lo; a < u.hi; ++a) L.self_off[a] = own[a] == -1 ? -1 : own[a] - u.plo;
    L.run_lo.push_back(u.lo);
    L.run_hi.push_back(u.hi);
    L.pos_lo.push_back(u.plo);
    L.pos_hi.push_back(u.phi);
  }
  return L;
}

// Per group of consecutive runs: its anchors [lo, hi) of X, and each run's first positive
// row in Q (after the group's anchors).
struct RefsGroup {
  int64_t k0, k1;            // runs [k0, k1)
  int64_t lo, hi;            // the group's anchors
  std::vector<int64_t> off;  // per run of the group: its positives' first row in Q
  int64_t rows = 0, wc = 0;  // Q's rows; the group's s_ap entries
};

inline std::vector<RefsGroup> refs_groups(const RefsLayout& L, int64_t M) {
  std::vector<RefsGroup> out;
  const int64_t n = static_cast<int64_t>(L.run_lo.size());
  for (int64_t k = 0; k < n;) {
    RefsGroup g{k, k, L.run_lo[k], L.run_lo[k], {}, 0, 0};
    int64_t pos_rows = 0;
    while (g.k1 < n) {
      const int64_t ka = L.run_hi[g.k1] - L.run_lo[g.k1], kp = L.pos_hi[g.k1] - L.pos_lo[g.k1];
      if (g.k1 > g.k0 && (g.rows + ka + kp) * std::max<int64_t>(M, 1) > L.group) break;
      g.off.push_back(pos_rows);
      pos_rows += kp;
      g.rows += ka + kp;
      g.wc += ka * kp;
      g.hi = L.run_hi[g.k1];
      ++g.k1;
    }
    for (int64_t& o : g.off) o += g.hi - g.lo;
    k = g.k1;
    out.push_back(std::move(g));
  }
  return out;
}

// The gradients a backward walk adds to (dr only when need_dr).
struct RefsGrads {
  at::Tensor dx, dr;
  bool need_dr;
};

// Walks the groups: per group Q (anchors, then positives), each anchor's s_ap (wc, a dot
// product per (anchor, positive)) and its MixGeom rows; then per chunk of the references'
// columns S = Q R_chunkᵀ, and per run side(geom)(lo, hi) in parallel over the runs, geom over
// the chunk's S and 1/‖v‖ (and, backward, gm: the chunk's zeroed ∂L/∂S, and gw: the group's
// ∂L/∂s_ap). A group's rows × chunk hold about L.group entries: the whole of R when they fit,
// else column chunks, whose fold states merge as the in-batch blocks' do. Backward (grads):
// each chunk's dX_g += G_a R_c, and with need_dr dR_c += Gᵀ Q and the positives' G_p R_c;
// the group's gw then adds x_a·r_p's share to both.
template <typename T, class Side>
void metrix_refs_walk(const at::Tensor& x, const at::Tensor& r, RefsLayout& L,
                      const int32_t* ids_x, const int32_t* ids_r, T lam, bool anchor_neg,
                      RefsGrads* grads, Side&& side) {
  const int64_t M = r.size(0), D = x.size(1);
  const T* xp = x.data_ptr<T>();
  for (const RefsGroup& g : refs_groups(L, M)) {
    std::vector<at::Tensor> parts{x.narrow(0, g.lo, g.hi - g.lo)};
    for (int64_t k = g.k0; k < g.k1; ++k)
      parts.push_back(r.narrow(0, L.pos_lo[k], L.pos_hi[k] - L.pos_lo[k]));
    const at::Tensor q = at::cat(parts);
    const int64_t na = g.hi - g.lo;
    std::vector<T> wc(g.wc), gw(grads ? g.wc : 0, T(0));
    // each anchor's positives as rows of the group (numbered from r0 = g.lo), and its s_ap
    for (int64_t k = g.k0, w = 0; k < g.k1; ++k) {
      const int64_t kp = L.pos_hi[k] - L.pos_lo[k], first = g.lo + g.off[k - g.k0];
      for (int64_t a = L.run_lo[k]; a < L.run_hi[k]; ++a, w += kp) {
        L.self_row[a] = L.self_off[a] < 0 ? -1 : first + L.self_off[a];
        L.cls_lo[a] = first;
        L.cls_hi[a] = first + kp;
        L.wc_off[a] = w;
      }
    }
    const T* qp = q.data_ptr<T>();  // a positive's row: its MixGeom row less g.lo
    at::parallel_for(g.lo, g.hi, 16, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        const T* xa = xp + a * D;
        for (int64_t j = 0; j < L.cls_hi[a] - L.cls_lo[a]; ++j) {
          const T* rj = qp + (L.cls_lo[a] - g.lo + j) * D;
          T acc = 0;
#pragma omp simd reduction(+ : acc)  // a reordered sum, as the product's own
          for (int64_t e = 0; e < D; ++e) acc += xa[e] * rj[e];
          wc[L.wc_off[a] + j] = acc;
        }
      }
    });
    const int64_t ncols =
        std::min<int64_t>(M, std::max<int64_t>(1, L.group / std::max<int64_t>(g.rows, 1)));
    at::Tensor dp =  // the positives' gradient rows, over the chunks
        grads && grads->need_dr ? at::zeros({g.rows - na, D}, x.options()) : at::Tensor();
    for (int64_t c0 = 0; c0 < M; c0 += ncols) {
      const int64_t nc = std::min(ncols, M - c0);
      const at::Tensor rc = r.narrow(0, c0, nc);
      const at::Tensor s = at::mm(q, rc.t());
      std::vector<T> inv(g.rows * nc);
      at::Tensor gm = grads ? at::zeros_like(s) : at::Tensor();
      const T* sp = s.data_ptr<T>();
      at::parallel_for(g.k0, g.k1, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t lo = L.run_lo[k], hi = L.run_hi[k], kp = L.pos_hi[k] - L.pos_lo[k];
          const int64_t pos_row = g.off[k - g.k0];
          mix_inv_norms<T>(sp + pos_row * nc, kp * nc, lam, inv.data() + pos_row * nc);
          bool own_mix = anchor_neg;  // some anchor mixes itself: its 1/‖v_an‖ too
          for (int64_t a = lo; a < hi && !own_mix; ++a)
            own_mix = L.cls_hi[a] - L.cls_lo[a] == (L.self_row[a] >= 0 ? 1 : 0);
          if (own_mix)
            mix_inv_norms<T>(sp + (lo - g.lo) * nc, (hi - lo) * nc, lam,
                             inv.data() + (lo - g.lo) * nc);
          const MixGeom<T> geo{sp, inv.data(), nc, g.lo, c0, ids_x, ids_r, L.cls_lo.data(),
                               L.cls_hi.data(), wc.data(), L.wc_off.data(), lam, anchor_neg,
                               grads ? gm.data_ptr<T>() : nullptr,
                               grads ? gw.data() : nullptr, L.self_row.data()};
          side(geo)(lo, hi);
        }
      });
      if (!grads) continue;
      grads->dx.narrow(0, g.lo, na).addmm_(gm.narrow(0, 0, na), rc);
      if (!grads->need_dr) continue;
      grads->dr.narrow(0, c0, nc).addmm_(gm.t(), q);
      dp.addmm_(gm.narrow(0, na, g.rows - na), rc);  // the positives' rows
    }
    if (!grads) continue;
    // s_ap = x_a·r_p: dx_a += Σ_p gw r_p and, with need_dr, dr_p += Σ_a gw x_a
    T* dxp = grads->dx.data_ptr<T>();
    at::parallel_for(g.lo, g.hi, 16, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a)
        for (int64_t j = 0; j < L.cls_hi[a] - L.cls_lo[a]; ++j) {
          const T w = gw[L.wc_off[a] + j];
          const T* rj = qp + (L.cls_lo[a] - g.lo + j) * D;
          if (w != T(0))
            for (int64_t e = 0; e < D; ++e) dxp[a * D + e] += w * rj[e];
        }
    });
    if (!grads->need_dr) continue;
    T* dpp = dp.data_ptr<T>();
    at::parallel_for(g.k0, g.k1, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t a = L.run_lo[k]; a < L.run_hi[k]; ++a)
          for (int64_t j = 0; j < L.cls_hi[a] - L.cls_lo[a]; ++j) {
            const T w = gw[L.wc_off[a] + j];
            T* dj = dpp + (L.cls_lo[a] - g.lo - na + j) * D;
            if (w != T(0))
              for (int64_t e = 0; e < D; ++e) dj[e] += w * xp[a * D + e];
          }
    });
    for (int64_t k = g.k0; k < g.k1; ++k) {
      const int64_t kp = L.pos_hi[k] - L.pos_lo[k];
      if (kp) grads->dr.narrow(0, L.pos_lo[k], kp).add_(dp.narrow(0, g.off[k - g.k0] - na, kp));
    }
  }
}

// Backward of the walk: dx, and dr when need_dr, from the kernels' gradient rows.
template <typename T, class Side>
std::pair<at::Tensor, at::Tensor> metrix_refs_grad(const at::Tensor& x, const at::Tensor& r,
                                                   RefsLayout& L, const int32_t* ids_x,
                                                   const int32_t* ids_r, T lam,
                                                   bool anchor_neg, bool need_dr,
                                                   Side&& side) {
  RefsGrads grads{at::zeros_like(x), at::zeros_like(r), need_dr};
  metrix_refs_walk<T>(x, r, L, ids_x, ids_r, lam, anchor_neg, &grads, side);
  return {grads.dx, grads.dr};
}

// The sorted inputs of a refs op, checked and contiguous, with the walk's layout and the
// shared label ids.
struct RefsCall {
  at::Tensor x, r, labels, ref_labels, own;
  RefsLayout layout;
  std::pair<at::Tensor, at::Tensor> ids;

  RefsCall(const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
           const at::Tensor& ref_labels_, const at::Tensor& self, double lam, int64_t group) {
    check_refs_inputs(x_, r_, labels_, ref_labels_, self, lam);
    x = x_.contiguous();
    r = r_.contiguous();
    labels = labels_.contiguous();
    ref_labels = ref_labels_.contiguous();
    own = self.contiguous();
    layout = refs_layout(labels, ref_labels, own, group);
    ids = ms_label_ids(labels, ref_labels);
  }

  // forward: side(geom) → kernel(a0, a1) folds each class's candidates
  template <typename T, class Side>
  void fold(double lam, bool anchor_neg, Side&& side) {
    metrix_refs_walk<T>(x, r, layout, ids.first.data_ptr<int32_t>(),
                        ids.second.data_ptr<int32_t>(), T(lam), anchor_neg, nullptr, side);
  }

  // backward: (dx, dr) from side(geom) → kernel(a0, a1) adding each class's ∂L/∂S
  template <typename T, class Side>
  std::pair<at::Tensor, at::Tensor> grad(double lam, bool anchor_neg, bool need_dr, Side&& side) {
    return metrix_refs_grad<T>(x, r, layout, ids.first.data_ptr<int32_t>(),
                               ids.second.data_ptr<int32_t>(), T(lam), anchor_neg, need_dr,
                               side);
  }
};

}  // namespace metrix_ops
