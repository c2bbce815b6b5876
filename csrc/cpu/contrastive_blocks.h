// Per-block work of the fused contrastive ops on the CPU, shared by the general op (anchors
// against references) and the batch-against-itself op: folding a block of S into per-row
// sums and counts of the kept hinge terms, and turning a block of S into a block of G.
#pragma once

#include <ATen/Parallel.h>
#include <torch/types.h>

#include <vector>

#include "common/contrastive.h"
#include "cpu/op_checks.h"

namespace metrix_ops {

// The loss's constants, in the element type.
template <typename T>
struct ConParams {
  bool cosine;
  T pos_margin, neg_margin;
  T low, high;  // the reducer's window, see in_window

  PairTerm<T> term(T s, bool pos) const {
    return contrastive_term(s, cosine, pos, pos ? pos_margin : neg_margin);
  }
};

// Labels of a block's rows and columns, by global index; with exclude_diag, global row
// i == global column j is the self pair, in neither set.
struct ConLabels {
  const int64_t* row;
  const int64_t* col;
  bool exclude_diag;
};

// What a row (or, in the symmetric op, a column) collects: the kept terms' sum per side,
// in double whatever T is (sums over up to M terms), and how many there were.
struct ConAcc {
  double pos_sum = 0, neg_sum = 0;
  int64_t pos_cnt = 0, neg_cnt = 0;

  void add_term(bool pos, double v) {
    if (pos) {
      pos_sum += v;
      ++pos_cnt;
    } else {
      neg_sum += v;
      ++neg_cnt;
    }
  }

  void add(const ConAcc& o) {
    pos_sum += o.pos_sum;
    neg_sum += o.neg_sum;
    pos_cnt += o.pos_cnt;
    neg_cnt += o.neg_cnt;
  }
};

template <typename T>
inline void con_push(ConAcc& a, const ConParams<T>& p, T s, bool pos) {
  const PairTerm<T> t = p.term(s, pos);
  if (in_window(t.value, p.low, p.high)) a.add_term(pos, t.value);
}

// Folds one row of S (global row gi; its nc entries are columns c0..) into acc[gi].
template <typename T>
void con_fold_row(const T* row, int64_t nc, int64_t gi, int64_t c0, ConLabels lab,
                  const ConParams<T>& p, ConAcc* acc) {
  const int64_t li = lab.row[gi];
  ConAcc a;
  for (int64_t j = 0; j < nc; ++j) {
    if (lab.exclude_diag && c0 + j == gi) continue;
    con_push(a, p, row[j], lab.col[c0 + j] == li);
  }
  acc[gi].add(a);
}

// Folds block s (nr×nc; global rows r0.., cols c0..) into the accumulators of its rows.
template <typename T>
void con_fold_rows(const T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0, ConLabels lab,
                   const ConParams<T>& p, ConAcc* acc) {
  at::parallel_for(0, nr, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) con_fold_row(s + i * nc, nc, r0 + i, c0, lab, p, acc);
  });
}

// Off-diagonal block of a symmetric S (rows and columns are both batch rows, disjoint
// ranges): term (i, j) is also term (j, i), so one pass feeds rows and columns. Threads
// split the rows; each keeps its own column accumulators, summed afterwards, so no two
// threads write one accumulator.
template <typename T>
void con_fold_sym(const T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                  const int64_t* labels, const ConParams<T>& p, ConAcc* acc) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nr / 8));
  std::vector<ConAcc> cols(parts * nc);
  at::parallel_for(0, parts, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      ConAcc* mine = cols.data() + b * nc;
      for (int64_t i = nr * b / parts; i < nr * (b + 1) / parts; ++i) {
        const int64_t li = labels[r0 + i];
        const T* row = s + i * nc;
        ConAcc a;
        for (int64_t j = 0; j < nc; ++j) {
          const bool pos = labels[c0 + j] == li;
          const PairTerm<T> t = p.term(row[j], pos);
          if (!in_window(t.value, p.low, p.high)) continue;
          a.add_term(pos, t.value);
          mine[j].add_term(pos, t.value);
        }
        acc[r0 + i].add(a);
      }
    }
  });
  for (int64_t b = 0; b < parts; ++b)
    for (int64_t j = 0; j < nc; ++j) acc[c0 + j].add(cols[b * nc + j]);
}

// Turns one row of S (global row gi, columns c0..) into its row of G in place: entry j
// becomes w_ij · ∂t_ij/∂s_ij for kept terms (0 otherwise), with w_ij the upstream gradient
// of the side's sum: g_row[gi], plus g_col[gj] when given (the symmetric op's
// H = G_IJ + G_JIᵀ, since t_ij = t_ji there).
template <typename T>
void con_grad_row(T* row, int64_t nc, int64_t gi, int64_t c0, ConLabels lab,
                  const ConParams<T>& p, const T* gpos_row, const T* gneg_row,
                  const T* gpos_col, const T* gneg_col) {
  const int64_t li = lab.row[gi];
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t gj = c0 + j;
    if (lab.exclude_diag && gj == gi) {
      row[j] = T(0);
      continue;
    }
    const bool pos = lab.col[gj] == li;
    const PairTerm<T> t = p.term(row[j], pos);
    if (!in_window(t.value, p.low, p.high)) {
      row[j] = T(0);
      continue;
    }
    T w = pos ? gpos_row[gi] : gneg_row[gi];
    if (gpos_col != nullptr) w += pos ? gpos_col[gj] : gneg_col[gj];
    row[j] = w * contrastive_slope(t, p.cosine, pos);
  }
}

// con_grad_row over every row of block s (nr×nc; global rows r0.., columns c0..)
template <typename T>
void con_grad_block(T* s, int64_t nr, int64_t nc, int64_t r0, int64_t c0, ConLabels lab,
                    const ConParams<T>& p, const T* gpos_row, const T* gneg_row,
                    const T* gpos_col, const T* gneg_col) {
  at::parallel_for(0, nr, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      con_grad_row(s + i * nc, nc, r0 + i, c0, lab, p, gpos_row, gneg_row, gpos_col, gneg_col);
  });
}

// The four per-row outputs (pos_sum, pos_cnt, neg_sum, neg_cnt) from the accumulators.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> con_outputs(
    const std::vector<ConAcc>& acc, const at::TensorOptions& opts) {
  const int64_t n = static_cast<int64_t>(acc.size());
  at::Tensor ps = at::empty({n}, opts.dtype(at::kDouble)), ns = at::empty_like(ps);
  at::Tensor pc = at::empty({n}, opts.dtype(at::kLong)), nc = at::empty_like(pc);
  double *pps = ps.data_ptr<double>(), *pns = ns.data_ptr<double>();
  int64_t *ppc = pc.data_ptr<int64_t>(), *pnc = nc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    pps[i] = acc[i].pos_sum;
    pns[i] = acc[i].neg_sum;
    ppc[i] = acc[i].pos_cnt;
    pnc[i] = acc[i].neg_cnt;
  }
  return {ps.to(opts.dtype()), pc, ns.to(opts.dtype()), nc};
}

}  // namespace metrix_ops
