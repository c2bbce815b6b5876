// Fused NT-Xent and SupCon losses on the CPU: unit anchors x (B×D) against unit references
// r (M×D), streaming S = x rᵀ in chunks of anchors (cpu/row_tiles.h); never B×M.
//
// NT-Xent: per anchor, the sum and count of its positive-pair losses inside the reducer's
// window (low, high), and the state (max, Σ e^{z − max}) of its negatives' logits, which the
// backward reuses. SupCon: per anchor, its loss and the log-sum-exp over its pairs.
// Each row's tile entries are first turned into logits z = s/τ in place.
#include <cmath>
#include <limits>

#include <torch/library.h>

#include "common/contrastive.h"  // in_window
#include "common/ntxent.h"
#include "cpu/row_tiles.h"
#include "cpu/ntxent_rows.h"
#include "cpu/supcon_rows.h"

namespace metrix_ops {

namespace {

void check_temperature(double t) {
  TORCH_CHECK(t != 0 && std::isfinite(t), "temperature must be finite and nonzero, got ", t);
}

// z ← s/τ in place; returns the max over the negatives (label mismatches), −inf if none
template <typename T>
T logits_neg_max(T* z, int64_t M, T t, const int32_t* col, int32_t yi) {
  T m = kNegInf<T>;
  _Pragma("omp simd reduction(max : m)")
  for (int64_t j = 0; j < M; ++j) {
    z[j] = ntx_logit(z[j], t);
    const T v = col[j] != yi ? z[j] : kNegInf<T>;
    m = v > m ? v : m;
  }
  return m;
}

// u ← e^{z − m} on the negatives, 0 elsewhere; returns their sum
template <typename T>
T neg_exp_sum(const T* z, T* u, int64_t M, T m, const int32_t* col, int32_t yi) {
  MO_SIMD
  for (int64_t j = 0; j < M; ++j) u[j] = col[j] != yi ? z[j] - m : kNegInf<T>;
  exp_row(u, M);
  T s = T(0);
  _Pragma("omp simd reduction(+ : s)")
  for (int64_t j = 0; j < M; ++j) s += u[j];
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ntxent_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, double temperature, double low,
    double high, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_temperature(temperature);
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor sums = at::zeros({B}, x.options()), neg_max = at::empty({B}, x.options());
  at::Tensor neg_sum = at::empty({B}, x.options());
  at::Tensor counts = at::zeros({B}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ntxent_fwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab = pair_labels(ids, exclude_diag, M);
    T *out = sums.data_ptr<T>(), *nm = neg_max.data_ptr<T>(), *ns = neg_sum.data_ptr<T>();
    int64_t* cnt = counts.data_ptr<int64_t>();
    const T t = T(temperature), lo = T(low), hi = T(high);
    for_each_sim_row<T>(x, r, chunk, [&](T* z, int64_t i, T* u) {
      const int32_t yi = lab.row[i];
      const int64_t skip = lab.skip(i);
      const T m = logits_neg_max(z, M, t, lab.col, yi);
      const T s = neg_exp_sum(z, u, M, m, lab.col, yi);
      T total = T(0);
      int64_t kept = 0;
      for (int64_t j = 0; j < M; ++j) {  // the positives: few, one exp each
        if (lab.col[j] != yi || j == skip) continue;
        const T loss = ntx_loss(ntx_prob(z[j], m, s));
        if (in_window(loss, lo, hi)) {
          total += loss;
          ++kept;
        }
      }
      out[i] = total;
      cnt[i] = kept;
      nm[i] = m;
      ns[i] = s;
    });
  });
  return {sums, counts, neg_max, neg_sum};
}

std::tuple<at::Tensor, at::Tensor> ntxent_bwd_cpu(
    const at::Tensor& grad_sums_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& neg_max_,
    const at::Tensor& neg_sum_, bool exclude_diag, double temperature, double low, double high,
    int64_t chunk, bool need_dr) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_temperature(temperature);
  const int64_t B = x_.size(0), M = r_.size(0);
  check_vec(grad_sums_, B, "grad_sums");
  check_vec(neg_max_, B, "neg_max");
  check_vec(neg_sum_, B, "neg_sum");
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  auto g = grad_sums_.to(x.scalar_type()).contiguous();
  auto neg_max = neg_max_.to(x.scalar_type()).contiguous();
  auto neg_sum = neg_sum_.to(x.scalar_type()).contiguous();
  at::Tensor dx, dr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ntxent_bwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab = pair_labels(ids, exclude_diag, M);
    const T *gp = g.data_ptr<T>(), *nm = neg_max.data_ptr<T>(), *ns = neg_sum.data_ptr<T>();
    const T t = T(temperature), lo = T(low), hi = T(high);
    std::tie(dx, dr) = sim_rows_backward<T>(x, r, chunk, need_dr, [&](T* z, int64_t i, T* u) {
      const int32_t yi = lab.row[i];
      const int64_t skip = lab.skip(i);
      const int32_t* col = lab.col;
      const T m = nm[i], s = ns[i];
      T w_total = T(0);  // the weights of the row's kept pairs, then its G (ntxent_rows.h)
      for (int64_t j = 0; j < M; ++j)
        if (col[j] == yi && j != skip) w_total += ntxent_kept_weight(ntx_logit(z[j], t), m, s, lo, hi);
      ntxent_grad_piece(z, M, yi, col, skip, t, gp[i] / t, m, s, w_total, lo, hi, u);  // dz/ds = 1/τ
    });
  });
  return {dx, dr};
}

std::tuple<at::Tensor, at::Tensor> supcon_fwd_cpu(const at::Tensor& x_, const at::Tensor& r_,
                                                  const at::Tensor& labels_,
                                                  const at::Tensor& ref_labels_,
                                                  bool exclude_diag, double temperature,
                                                  int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_temperature(temperature);
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options()), lse = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "supcon_fwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab = pair_labels(ids, exclude_diag, M);
    T *out = rows.data_ptr<T>(), *lo = lse.data_ptr<T>();
    const T t = T(temperature), ninf = kNegInf<T>;
    for_each_sim_row<T>(x, r, chunk, [&](T* z, int64_t i, T* u) {
      const int32_t yi = lab.row[i];
      const int64_t skip = lab.skip(i);  // every other column is a pair
      const int32_t* col = lab.col;
      T row_max = ninf, pair_max = ninf;  // over every column (PML's shift), over the pairs
      _Pragma("omp simd reduction(max : row_max, pair_max)")
      for (int64_t j = 0; j < M; ++j) {
        z[j] = ntx_logit(z[j], t);
        row_max = z[j] > row_max ? z[j] : row_max;
        const T v = j != skip ? z[j] : ninf;
        pair_max = v > pair_max ? v : pair_max;
      }
      const T m = pair_max - row_max;  // the max of the shifted pair logits u = z − row max
      T pos_sum = T(0), n_pos = T(0);
      _Pragma("omp simd reduction(+ : pos_sum, n_pos)")
      for (int64_t j = 0; j < M; ++j) {
        const T uj = z[j] - row_max;
        u[j] = j != skip ? uj - m : ninf;
        const bool pos = col[j] == yi && j != skip;
        pos_sum += pos ? uj : T(0);
        n_pos += pos ? T(1) : T(0);
      }
      exp_row(u, M);
      T s = T(0);
      _Pragma("omp simd reduction(+ : s)")
      for (int64_t j = 0; j < M; ++j) s += u[j];
      if (s > T(0)) {
        const T lse_shifted = m + std::log(s);
        out[i] = supcon_loss(lse_shifted, pos_sum, n_pos);
        lo[i] = row_max + lse_shifted;
      } else {  // no pairs
        lo[i] = ninf;
      }
    });
  });
  return {rows, lse};
}

std::tuple<at::Tensor, at::Tensor> supcon_bwd_cpu(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_,
    bool exclude_diag, double temperature, int64_t chunk, bool need_dr) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_temperature(temperature);
  const int64_t B = x_.size(0), M = r_.size(0);
  check_vec(grad_rows_, B, "grad_rows");
  check_vec(lse_, B, "lse");
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  auto g = grad_rows_.to(x.scalar_type()).contiguous(), lse = lse_.to(x.scalar_type()).contiguous();
  at::Tensor dx, dr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "supcon_bwd_cpu", [&] {
    using T = scalar_t;
    const PairLabels lab = pair_labels(ids, exclude_diag, M);
    const T *gp = g.data_ptr<T>(), *lp = lse.data_ptr<T>();
    const T t = T(temperature);
    std::tie(dx, dr) = sim_rows_backward<T>(x, r, chunk, need_dr, [&](T* z, int64_t i, T* u) {
      const int32_t yi = lab.row[i];
      const int64_t skip = lab.skip(i);
      const int32_t* col = lab.col;
      int64_t n_pos = 0;
      _Pragma("omp simd reduction(+ : n_pos)")
      for (int64_t j = 0; j < M; ++j) n_pos += col[j] == yi && j != skip;
      supcon_grad_piece(z, M, yi, col, skip, t, gp[i], lp[i], n_pos, u);
    });
  });
  return {dx, dr};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // NT-Xent rows of unit anchors x against unit references r (exclude_diag: r is the batch and
  // pair (i, i) is no pair), streamed over x in chunks of `chunk` rows: per anchor, the sum
  // and count of its positive-pair losses −log(q + tiny) inside (low, high), and its
  // negatives' logit max and Σ e^{z − max} (z = s/temperature).
  m.def("ntxent_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, bool exclude_diag, "
        "float temperature, float low, float high, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ntxent_bwd(Tensor grad_sums, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor neg_max, Tensor neg_sum, bool exclude_diag, float temperature, float low, "
        "float high, int chunk, bool need_dr) -> (Tensor, Tensor)");
  // SupCon rows: per anchor, −mean over its positives of the log-softmax of z over its pairs
  // (0 without positives), and that log-sum-exp.
  m.def("supcon_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, bool exclude_diag, "
        "float temperature, int chunk) -> (Tensor, Tensor)");
  m.def("supcon_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor lse, bool exclude_diag, float temperature, int chunk, bool need_dr) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ntxent_fwd", &ntxent_fwd_cpu);
  m.impl("ntxent_bwd", &ntxent_bwd_cpu);
  m.impl("supcon_fwd", &supcon_fwd_cpu);
  m.impl("supcon_bwd", &supcon_bwd_cpu);
}

}  // namespace metrix_ops
