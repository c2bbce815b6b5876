// Fused lifted-structure losses on the CPU (PML's GeneralizedLiftedStructureLoss and
// LiftedStructureLoss): unit anchors x (B×D) against unit references r (M×D), S = x rᵀ
// streamed in chunks of r; never B×M. Per-element math: common/lifted.h.
//
// GeneralizedLifted: per anchor, the positive and negative log-sum-exps of one streaming
// pass (two passes per row of a tile: the extreme exponent, then Σ e^{arg − max}), so the
// forward keeps two numbers per row. Backward recomputes each chunk of S and turns it into
// the chunk of G = ∂L/∂S in place; dx += G r_c, dr_c = Gᵀ x.
//
// Lifted: one term per positive pair (a, p) from the negative log-sum-exps of rows a and
// partner(p) (the batch row with p's index, PML's quirk) and s_ap. Forward: the streaming
// pass for every row's negative log-sum-exp, then the positive pairs, which for a batch
// and references both sorted by label are the diagonal blocks of S: computed per group of
// classes, not as B×M. It returns per anchor the sum and count of the terms the reducer
// keeps (its window low < term < high), as the contrastive op. Backward: the positive
// blocks give each row's weight on its negative log-sum-exp and the positive pairs' G;
// then one streaming pass spreads those weights over the negatives.
//
// The *_self ops take the batch against itself (self pairs excluded) and walk the blocks
// I <= J of the symmetric S = x xᵀ once instead of streaming (see Walk).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/lifted.h"
#include "cpu/contrastive_blocks.h"  // ConLabels
#include "cpu/op_checks.h"
#include "cpu/self_walk.h"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

// Labels of a tile's rows and columns by global index, and the self-pair rule: the
// contrastive ops' (contrastive_blocks.h)
using LiftLabels = ConLabels;

template <typename T>
struct LiftParams {
  bool cosine;
  T pos_margin, neg_margin;
};

// Folds row gi of a tile (nc similarities, global columns c0..) into its states: the
// positive side only when pos != nullptr (the lifted op needs the negatives alone).
template <typename T>
void fold_row(const T* s, int64_t nc, int64_t gi, int64_t c0, const LiftLabels& lab,
              const LiftParams<T>& p, OnlineLse<T>* pos, OnlineLse<T>& neg) {
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t li = lab.row[gi], skip = lab.exclude_diag ? gi - c0 : -1;
  const int64_t* col = lab.col + c0;
  T lo = inf, hi = -inf;  // smallest positive s, largest negative s: the largest exponents
  for (int64_t j = 0; j < nc; ++j) {
    if (j == skip) continue;
    if (col[j] == li) lo = s[j] < lo ? s[j] : lo;
    else hi = s[j] > hi ? s[j] : hi;
  }
  const bool any_pos = pos != nullptr && lo < inf, any_neg = hi > -inf;
  if (!any_pos && !any_neg) return;
  const T top_p = any_pos ? lifted_pos_arg(lifted_dist(lo, p.cosine), p.cosine, p.pos_margin) : T(0);
  const T top_n = any_neg ? lifted_neg_arg(lifted_dist(hi, p.cosine), p.cosine, p.neg_margin) : T(0);
  T sp = 0, sn = 0;
  for (int64_t j = 0; j < nc; ++j) {
    if (j == skip) continue;
    const T t = lifted_dist(s[j], p.cosine);
    if (col[j] == li) {
      if (any_pos) sp += std::exp(lifted_pos_arg(t, p.cosine, p.pos_margin) - top_p);
    } else {
      sn += std::exp(lifted_neg_arg(t, p.cosine, p.neg_margin) - top_n);
    }
  }
  if (any_pos) pos->merge(OnlineLse<T>{top_p, sp});
  if (any_neg) neg.merge(OnlineLse<T>{top_n, sn});
}

template <typename T>
std::vector<OnlineLse<T>> empty_states(int64_t n) {
  return std::vector<OnlineLse<T>>(n, OnlineLse<T>::empty());
}

}  // namespace

// ---------------------------------------------------------------- GeneralizedLifted

namespace {

// The body of both forward ops (self: r is x, labels are ref_labels, self pairs excluded)
std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_lifted_fwd_impl(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk, bool self, bool raw = false) {
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  const at::Tensor sq = raw ? walk_norms(x, r, self) : at::Tensor();
  at::Tensor rows = at::empty({B}, x.options());
  at::Tensor lse_pos = at::empty({B}, x.options()), lse_neg = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gen_lifted_fwd_cpu", [&] {
    using T = scalar_t;
    const LiftParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    const LiftLabels lab{labels.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(), exclude_diag};
    auto pos = empty_states<T>(B), neg = empty_states<T>(B);
    walk_rows<T>(Walk{x, r, self, chunk, sq}, [&](const T* row, int64_t nc, int64_t gi, int64_t c0) {
      fold_row(row, nc, gi, c0, lab, p, &pos[gi], neg[gi]);
    });
    T *out = rows.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      lp[i] = pos[i].value();
      ln[i] = neg[i].value();
      const T pre = gen_lifted_pre(lp[i], ln[i]);
      out[i] = pre > T(0) ? pre : T(0);
    }
  });
  return {rows, lse_pos, lse_neg};
}

// The body of both backward ops; self: dx holds the whole gradient
std::tuple<at::Tensor, at::Tensor> gen_lifted_bwd_impl(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk, bool self, bool raw = false) {
  const int64_t B = x_.size(0);
  check_vec(grad_rows_, B, "grad_rows");
  check_vec(lse_pos_, B, "lse_pos");
  check_vec(lse_neg_, B, "lse_neg");
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows_.to(x.scalar_type()).contiguous();
  auto lse_pos = lse_pos_.to(x.scalar_type()).contiguous();
  auto lse_neg = lse_neg_.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::zeros_like(x), dr = self ? dx : at::zeros_like(r);
  const at::Tensor sq = raw ? walk_norms(x, r, self) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gen_lifted_bwd_cpu", [&] {
    using T = scalar_t;
    const T pm = T(pos_margin), nm = T(neg_margin);
    const int64_t *y = labels.data_ptr<int64_t>(), *ry = ref_labels.data_ptr<int64_t>();
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    walk_grad<T>(Walk{x, r, self, chunk, sq}, dx, dr, [&](T* row, int64_t nc, int64_t i, int64_t c0) {
      for (int64_t j = 0; j < nc; ++j) {
        const bool diag = exclude_diag && c0 + j == i;
        row[j] = diag ? T(0)
                      : gen_lifted_grad(row[j], ry[c0 + j] == y[i], cosine, pm, nm, gp[i],
                                        lp[i], ln[i]);
      }
    });
  });
  return {dx, dr};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_lifted_fwd_cpu(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk, bool raw) {
  check_pair_inputs(x, r, labels, ref_labels, chunk);
  return gen_lifted_fwd_impl(x, r, labels, ref_labels, exclude_diag, cosine, pos_margin,
                             neg_margin, chunk, false, raw);
}

std::tuple<at::Tensor, at::Tensor> gen_lifted_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk, bool raw) {
  check_pair_inputs(x, r, labels, ref_labels, chunk);
  return gen_lifted_bwd_impl(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg,
                             exclude_diag, cosine, pos_margin, neg_margin, chunk, false, raw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_lifted_self_fwd_cpu(
    const at::Tensor& x, const at::Tensor& labels, bool cosine, double pos_margin,
    double neg_margin, int64_t block, bool raw) {
  check_self_inputs(x, labels, block);
  return gen_lifted_fwd_impl(x, x, labels, labels, true, cosine, pos_margin, neg_margin, block,
                             true, raw);
}

at::Tensor gen_lifted_self_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x,
                                   const at::Tensor& labels, const at::Tensor& lse_pos,
                                   const at::Tensor& lse_neg, bool cosine, double pos_margin,
                                   double neg_margin, int64_t block, bool raw) {
  check_self_inputs(x, labels, block);
  return std::get<0>(gen_lifted_bwd_impl(grad_rows, x, x, labels, labels, lse_pos, lse_neg,
                                         true, cosine, pos_margin, neg_margin, block, true,
                                         raw));
}

// ---------------------------------------------------------------- Lifted

namespace {

// Both label vectors sorted: anchor i's positives are the references [lo[i], hi[i]).
struct PosLayout {
  std::vector<int64_t> lo, hi;
  // groups of whole classes of anchors [rows[k], rows[k+1]) whose positives lie in the
  // references [cols[k], cole[k]): one tile (or a few, for a class above `block`) each
  std::vector<int64_t> rows, cols, cole;
};

void check_sorted(const at::Tensor& t, const char* name) {
  if (t.numel() > 1)
    TORCH_CHECK((t.narrow(0, 1, t.numel() - 1) >= t.narrow(0, 0, t.numel() - 1)).all().item<bool>(),
                name, " must be sorted (non-decreasing): the lifted op finds positive pairs "
                "as the diagonal blocks of a label-sorted S");
}

PosLayout pos_layout(const at::Tensor& labels, const at::Tensor& ref_labels, int64_t block) {
  const int64_t *y = labels.data_ptr<int64_t>(), *ry = ref_labels.data_ptr<int64_t>();
  const int64_t B = labels.size(0), M = ref_labels.size(0);
  PosLayout L;
  L.lo.resize(B);
  L.hi.resize(B);
  for (int64_t i = 0; i < B; ++i) {
    L.lo[i] = std::lower_bound(ry, ry + M, y[i]) - ry;
    L.hi[i] = std::upper_bound(ry, ry + M, y[i]) - ry;
  }
  // greedy groups: add the next class while the group stays within block × block
  auto class_end = [&](int64_t a) {
    while (++a < B && y[a] == y[a - 1]) {}
    return a;
  };
  for (int64_t a = 0; a < B;) {
    const int64_t g0 = a;
    int64_t e = class_end(a);
    while (e < B) {
      const int64_t f = class_end(e);
      if (f - g0 > block || L.hi[f - 1] - L.lo[g0] > block) break;
      e = f;
    }
    L.rows.push_back(g0);
    L.cols.push_back(L.lo[g0]);
    L.cole.push_back(L.hi[e - 1]);
    a = e;
  }
  L.rows.push_back(B);
  return L;
}

// fn(s, r0, nr, c0, nc) for tiles covering every positive pair: s = x_rows r_colsᵀ,
// contiguous, at most block × block (the callee may overwrite it)
template <class F>
void for_pos_tiles(const at::Tensor& x, const at::Tensor& r, const PosLayout& L, int64_t block,
                   F&& fn) {
  for (size_t k = 0; k + 1 < L.rows.size(); ++k) {
    for (int64_t r0 = L.rows[k]; r0 < L.rows[k + 1]; r0 += block) {
      const int64_t nr = std::min(block, L.rows[k + 1] - r0);
      for (int64_t c0 = L.cols[k]; c0 < L.cole[k]; c0 += block) {
        const int64_t nc = std::min(block, L.cole[k] - c0);
        at::Tensor s = at::mm(x.narrow(0, r0, nr), r.narrow(0, c0, nc).t()).contiguous();
        fn(s, r0, nr, c0, nc);
      }
    }
  }
}

// Positive tiles are at most this square (or `chunk`, if smaller): groups of small classes
// then waste at most B·kPosBlock·D of products on the pairs between their classes, a small
// fraction of the B·M·D of the streaming pass.
constexpr int64_t kPosBlock = 256;

struct LiftedCall {
  at::Tensor x, r, labels, ref_labels, partner;
  int64_t block;
  bool self;  // r is x (the batch against itself, self pairs excluded)
  PosLayout layout;
  // rows of any norm: their squared norms (walk_norms: x's, then, general, r's); every tile
  // of S is handed on as 1 − d²/2 (raw_tile) and the gradients gain d²'s radial part; else
  // undefined
  at::Tensor sq = {};

  // rewrites tile s (rows r0.. of x, columns c0.. of r) as 1 − d²/2 when the rows are raw
  template <typename T>
  void raw_tile(T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) const {
    if (!sq.defined()) return;
    const T* q = sq.data_ptr<T>();
    raw_to_unit_sims_of(s, nr, nc, q + r0, q + (self ? 0 : x.size(0)) + c0, x.size(1));
  }
};

LiftedCall lifted_call(const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
                       const at::Tensor& ref_labels_, const at::Tensor& partner_, int64_t chunk,
                       bool raw) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  TORCH_CHECK(partner_.scalar_type() == at::kLong, "partner must be int64");
  check_vec(partner_, r_.size(0), "partner");
  LiftedCall c{x_.contiguous(), r_.contiguous(), labels_.contiguous(), ref_labels_.contiguous(),
               partner_.contiguous(), std::min(chunk, kPosBlock), false, {}};
  if (c.partner.numel()) {
    const int64_t lo = c.partner.min().item<int64_t>(), hi = c.partner.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < x_.size(0), "partner must be in [-1, ", x_.size(0),
                ") (a row of x, or -1 for none), got values in [", lo, ", ", hi, "]");
  }
  check_sorted(c.labels, "labels");
  check_sorted(c.ref_labels, "ref_labels");
  c.layout = pos_layout(c.labels, c.ref_labels, c.block);
  if (raw) c.sq = walk_norms(c.x, c.r, false);
  return c;
}

LiftedCall lifted_self_call(const at::Tensor& x_, const at::Tensor& labels_, int64_t block,
                            bool raw) {
  check_self_inputs(x_, labels_, block);
  const at::Tensor x = x_.contiguous(), labels = labels_.contiguous();
  LiftedCall c{x, x, labels, labels, at::arange(x.size(0), labels.options()),
               std::min(block, kPosBlock), true, {}, raw ? sq_norms(x) : at::Tensor()};
  check_sorted(c.labels, "labels");
  c.layout = pos_layout(c.labels, c.ref_labels, c.block);
  return c;
}

// The lifted term of positive pair (row gi, reference gj) from the rows' negative lse's
template <typename T>
LiftedPair<T> pair_at(T s, int64_t gi, int64_t gj, const int64_t* partner, const T* ln,
                      const LiftParams<T>& p) {
  const int64_t q = partner[gj];
  const T lse_p = (q >= 0 && q != gi) ? ln[q] : -std::numeric_limits<T>::infinity();
  return lifted_pair(s, ln[gi], lse_p, p.cosine, p.pos_margin);
}

// The bodies of the general and the self ops
std::tuple<at::Tensor, at::Tensor, at::Tensor> lifted_fwd_impl(
    const LiftedCall& c, bool exclude_diag, bool cosine, double pos_margin, double neg_margin,
    double low, double high, int64_t chunk) {
  const int64_t B = c.x.size(0);
  at::Tensor lse_neg = at::empty({B}, c.x.options());
  std::vector<double> sums(B, 0.0);
  at::Tensor counts = at::zeros({B}, c.x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lifted_fwd_cpu", [&] {
    using T = scalar_t;
    const LiftParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    const LiftLabels lab{c.labels.data_ptr<int64_t>(), c.ref_labels.data_ptr<int64_t>(), exclude_diag};
    auto neg = empty_states<T>(B);
    walk_rows<T>(Walk{c.x, c.r, c.self, chunk, c.sq}, [&](const T* row, int64_t nc, int64_t gi, int64_t c0) {
      fold_row<T>(row, nc, gi, c0, lab, p, nullptr, neg[gi]);
    });
    T* ln = lse_neg.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) ln[i] = neg[i].value();
    const int64_t* partner = c.partner.data_ptr<int64_t>();
    int64_t* cnt = counts.data_ptr<int64_t>();
    const T lo_w = T(low), hi_w = T(high);
    for_pos_tiles(c.x, c.r, c.layout, c.block, [&](at::Tensor& s, int64_t r0, int64_t nr,
                                                  int64_t c0, int64_t nc) {
      T* sp = s.data_ptr<T>();
      c.raw_tile(sp, r0, nr, c0, nc);
      at::parallel_for(0, nr, row_grain(nc), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t gi = r0 + i;
          const int64_t j0 = std::max(c.layout.lo[gi], c0), j1 = std::min(c.layout.hi[gi], c0 + nc);
          for (int64_t gj = j0; gj < j1; ++gj) {
            if (exclude_diag && gj == gi) continue;
            const T v = pair_at(sp[i * nc + gj - c0], gi, gj, partner, ln, p).value;
            if (!in_window(v, lo_w, hi_w)) continue;
            sums[gi] += v;
            ++cnt[gi];
          }
        }
      });
    });
  });
  at::Tensor out = at::tensor(sums, c.x.options().dtype(at::kDouble)).to(c.x.scalar_type());
  return {out, counts, lse_neg};
}

std::tuple<at::Tensor, at::Tensor> lifted_bwd_impl(
    const LiftedCall& c, const at::Tensor& grad_sums_, const at::Tensor& lse_neg_,
    bool exclude_diag, bool cosine, double pos_margin, double neg_margin, double low,
    double high, int64_t chunk) {
  const int64_t B = c.x.size(0);
  check_vec(grad_sums_, B, "grad_sums");
  check_vec(lse_neg_, B, "lse_neg");
  auto g = grad_sums_.to(c.x.scalar_type()).contiguous();
  auto lse_neg = lse_neg_.to(c.x.scalar_type()).contiguous();
  // self: the positive blocks' dr and dx land in the same tensor
  at::Tensor dx = at::zeros_like(c.x), dr = c.self ? dx : at::zeros_like(c.r);
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "lifted_bwd_cpu", [&] {
    using T = scalar_t;
    const LiftParams<T> p{cosine, T(pos_margin), T(neg_margin)};
    const int64_t *y = c.labels.data_ptr<int64_t>(), *ry = c.ref_labels.data_ptr<int64_t>();
    const int64_t* partner = c.partner.data_ptr<int64_t>();
    const T *gp = g.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    const T lo_w = T(low), hi_w = T(high);
    // each row's weight on its negative log-sum-exp, from the pairs that use it
    std::vector<T> w(B, T(0));
    for_pos_tiles(c.x, c.r, c.layout, c.block, [&](at::Tensor& s, int64_t r0, int64_t nr,
                                                  int64_t c0, int64_t nc) {
      T* sp = s.data_ptr<T>();
      c.raw_tile(sp, r0, nr, c0, nc);
      std::vector<T> wp(nr * nc, T(0));  // the partners' shares, summed per column below
      at::parallel_for(0, nr, row_grain(nc), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t gi = r0 + i;
          const int64_t j0 = std::max(c.layout.lo[gi], c0), j1 = std::min(c.layout.hi[gi], c0 + nc);
          T* row = sp + i * nc;
          T own = 0;
          for (int64_t j = 0; j < nc; ++j) {
            const int64_t gj = c0 + j;
            T gij = T(0);
            if (gj >= j0 && gj < j1 && !(exclude_diag && gj == gi)) {
              const LiftedPair<T> q = pair_at(row[j], gi, gj, partner, ln, p);
              if (in_window(q.value, lo_w, hi_w)) {
                const T gh = gp[gi] * lifted_dh(q);
                own += gh * q.w_a;
                wp[i * nc + j] = gh * q.w_p;
                gij = -gh * q.k;  // ∂(pos exponent)/∂s = −k
              }
            }
            row[j] = gij;
          }
          w[gi] += own;
        }
      });
      // partner rows are distinct per column: no two columns write one row
      at::parallel_for(0, nc, 64, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t q = partner[c0 + j];
          if (q < 0) continue;
          T acc = 0;
          for (int64_t i = 0; i < nr; ++i) acc += wp[i * nc + j];
          w[q] += acc;
        }
      });
      dx.narrow(0, r0, nr).addmm_(s, c.r.narrow(0, c0, nc));
      dr.narrow(0, c0, nc).addmm_(s.t(), c.x.narrow(0, r0, nr));
      if (c.sq.defined()) {  // ∂s̃_ij = (r_j − x_i)·∂x_i + (x_i − r_j)·∂r_j: the −x_i, −r_j parts
        dx.narrow(0, r0, nr).addcmul_(s.sum(1, true), c.x.narrow(0, r0, nr), -1);
        dr.narrow(0, c0, nc).addcmul_(s.sum(0).unsqueeze(1), c.r.narrow(0, c0, nc), -1);
      }
    });
    // the negatives: ∂lse⁻_i/∂s_in = e^{neg exponent − lse⁻_i}·k
    walk_grad<T>(Walk{c.x, c.r, c.self, chunk, c.sq}, dx, dr, [&](T* row, int64_t nc, int64_t i, int64_t c0) {
      const T wi = w[i];
      for (int64_t j = 0; j < nc; ++j) {
        if (wi == T(0) || ry[c0 + j] == y[i]) {  // positives and the self pair: not negatives
          row[j] = T(0);
          continue;
        }
        const T t = lifted_dist(row[j], p.cosine);
        row[j] = wi * lifted_slope(t, p.cosine) *
                 std::exp(lifted_neg_arg(t, p.cosine, p.neg_margin) - ln[i]);
      }
    });
  });
  return {dx, dr};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lifted_fwd_cpu(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& partner, bool exclude_diag, bool cosine,
    double pos_margin, double neg_margin, double low, double high, int64_t chunk, bool raw) {
  return lifted_fwd_impl(lifted_call(x, r, labels, ref_labels, partner, chunk, raw), exclude_diag,
                         cosine, pos_margin, neg_margin, low, high, chunk);
}

std::tuple<at::Tensor, at::Tensor> lifted_bwd_cpu(
    const at::Tensor& grad_sums, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& partner,
    const at::Tensor& lse_neg, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t chunk, bool raw) {
  return lifted_bwd_impl(lifted_call(x, r, labels, ref_labels, partner, chunk, raw), grad_sums,
                         lse_neg, exclude_diag, cosine, pos_margin, neg_margin, low, high, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lifted_self_fwd_cpu(
    const at::Tensor& x, const at::Tensor& labels, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t block, bool raw) {
  return lifted_fwd_impl(lifted_self_call(x, labels, block, raw), true, cosine, pos_margin,
                         neg_margin, low, high, block);
}

at::Tensor lifted_self_bwd_cpu(const at::Tensor& grad_sums, const at::Tensor& x,
                               const at::Tensor& labels, const at::Tensor& lse_neg, bool cosine,
                               double pos_margin, double neg_margin, double low, double high,
                               int64_t block, bool raw) {
  return std::get<0>(lifted_bwd_impl(lifted_self_call(x, labels, block, raw), grad_sums, lse_neg,
                                     true, cosine, pos_margin, neg_margin, low, high, block));
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // GeneralizedLiftedStructureLoss of unit anchors x against unit references r, streamed
  // over r in chunks: per anchor [lse⁺ + lse⁻]₊ (PML's form, empty side 0), and the two
  // log-sum-exps (-inf: no pair) the backward needs. cosine: CosineSimilarity margins, else
  // normalised L2 distance. raw (CPU only): rows of any norm, their L2 distance
  // (self_walk.h's sq).
  m.def("gen_lifted_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "bool exclude_diag, bool cosine, float pos_margin, float neg_margin, int chunk, "
        "bool raw=False) -> (Tensor, Tensor, Tensor)");
  m.def("gen_lifted_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, "
        "Tensor ref_labels, Tensor lse_pos, Tensor lse_neg, bool exclude_diag, bool cosine, "
        "float pos_margin, float neg_margin, int chunk, bool raw=False) -> (Tensor, Tensor)");
  // The same against the batch itself (self pairs excluded), using the symmetry of S:
  // blocks I <= J of `block` rows only. raw: rows of any norm, their L2 distance
  // (self_walk.h's sq).
  m.def("gen_lifted_self_fwd(Tensor x, Tensor labels, bool cosine, float pos_margin, "
        "float neg_margin, int block, bool raw=False) -> (Tensor, Tensor, Tensor)");
  m.def("gen_lifted_self_bwd(Tensor grad_rows, Tensor x, Tensor labels, Tensor lse_pos, "
        "Tensor lse_neg, bool cosine, float pos_margin, float neg_margin, int block, "
        "bool raw=False) -> Tensor");
  // LiftedStructureLoss of unit anchors x against unit references r, both sorted by label:
  // per anchor a, the sum and count of the kept terms ½[lse + pos exponent]₊² of its
  // positive pairs (a, p) (kept: low < term < high), and every row's negative
  // log-sum-exp. lse combines the negatives of row a and of row partner[p] (-1: none).
  // raw (CPU only): rows of any norm, their L2 distance (self_walk.h's sq).
  m.def("lifted_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, Tensor partner, "
        "bool exclude_diag, bool cosine, float pos_margin, float neg_margin, float low, "
        "float high, int chunk, bool raw=False) -> (Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("lifted_bwd(Tensor grad_sums, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor partner, Tensor lse_neg, bool exclude_diag, bool cosine, float pos_margin, "
        "float neg_margin, float low, float high, int chunk, bool raw=False) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
  // The same against the batch itself (sorted labels, self pairs excluded, partner[p] = p),
  // its negative pass over the blocks I <= J of the symmetric S
  m.def("lifted_self_fwd(Tensor x, Tensor labels, bool cosine, float pos_margin, "
        "float neg_margin, float low, float high, int block, bool raw=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("lifted_self_bwd(Tensor grad_sums, Tensor x, Tensor labels, Tensor lse_neg, "
        "bool cosine, float pos_margin, float neg_margin, float low, float high, int block, "
        "bool raw=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("gen_lifted_fwd", &gen_lifted_fwd_cpu);
  m.impl("gen_lifted_bwd", &gen_lifted_bwd_cpu);
  m.impl("lifted_fwd", &lifted_fwd_cpu);
  m.impl("lifted_bwd", &lifted_bwd_cpu);
  m.impl("gen_lifted_self_fwd", &gen_lifted_self_fwd_cpu);
  m.impl("gen_lifted_self_bwd", &gen_lifted_self_bwd_cpu);
  m.impl("lifted_self_fwd", &lifted_self_fwd_cpu);
  m.impl("lifted_self_bwd", &lifted_self_bwd_cpu);
}

}  // namespace metrix_ops
