// Fused NT-Xent of a batch against itself (no ref_emb: SimCLR's two views, or any labelled
// batch) on the CPU: the blocks I <= J of the symmetric S = x xᵀ once (self_walk.h), half
// the products of the general op (ntxent_cpu.cpp), which streams whole rows.
//
// A positive pair's loss needs its anchor's finished negative log-sum-exp, which a block walk
// has only at the end: the walk folds each piece's negatives into the anchor's online state
// and keeps its positives' logits (few: the anchor's class), and the pair losses are taken
// after the walk, in column order as the general op. The forward also returns each anchor's
// Σ w_p over its kept pairs (independent of the upstream gradient), which the backward's
// negatives need before its walk reaches the positives.
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "common/row_state.h"
#include "cpu/ntxent_rows.h"
#include "cpu/self_walk.h"

namespace metrix_ops {

namespace {

void check_temperature_ntx(double t) {
  TORCH_CHECK(t != 0 && std::isfinite(t), "temperature must be finite and nonzero, got ", t);
}

// one anchor's state: its negatives' (max, Σ e^{z − max}), and its positives (column, logit)
template <typename T>
struct NtxState {
  OnlineLse<T> neg = OnlineLse<T>::empty();
  std::vector<std::pair<int64_t, T>> pos;
};

template <typename T>
void fold_piece(const T* s, int64_t nc, int32_t yi, const int32_t* col, int64_t skip,
                int64_t c0, T t, T* u, NtxState<T>& st) {
  const T ninf = kNegInf<T>;
  T m = ninf;
  _Pragma("omp simd reduction(max : m)")
  for (int64_t j = 0; j < nc; ++j) {
    const T v = col[j] != yi ? ntx_logit(s[j], t) : ninf;
    m = v > m ? v : m;
  }
  for (int64_t j = 0; j < nc; ++j)
    if (col[j] == yi && j != skip) st.pos.emplace_back(c0 + j, ntx_logit(s[j], t));
  if (m == ninf) return;  // no negative here
  MO_SIMD
  for (int64_t j = 0; j < nc; ++j) u[j] = col[j] != yi ? ntx_logit(s[j], t) - m : ninf;
  exp_row(u, nc);
  T sum = T(0);
  _Pragma("omp simd reduction(+ : sum)")
  for (int64_t j = 0; j < nc; ++j) sum += u[j];
  st.neg.merge(OnlineLse<T>{m, sum});
}

}  // namespace

using FiveTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FiveTensors ntxent_self_fwd_cpu(const at::Tensor& x_, const at::Tensor& labels,
                                double temperature, double low, double high, int64_t block) {
  check_self_inputs(x_, labels, block);
  check_temperature_ntx(temperature);
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  const int64_t B = x.size(0);
  at::Tensor sums = at::zeros({B}, x.options()), neg_max = at::empty({B}, x.options());
  at::Tensor neg_sum = at::empty({B}, x.options()), w_total = at::zeros({B}, x.options());
  at::Tensor counts = at::zeros({B}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ntxent_self_fwd_cpu", [&] {
    using T = scalar_t;
    const T t = T(temperature), lo = T(low), hi = T(high);
    const int32_t* id = ids.data_ptr<int32_t>();
    std::vector<NtxState<T>> st(B);
    walk_rows<T>(Walk{x, x, true, block}, [&](const T* s, int64_t nc, int64_t gi, int64_t c0) {
      fold_piece(s, nc, id[gi], id + c0, gi - c0, c0, t, scratch_row<T>(nc), st[gi]);
    });
    T *out = sums.data_ptr<T>(), *nm = neg_max.data_ptr<T>(), *ns = neg_sum.data_ptr<T>();
    T* wt = w_total.data_ptr<T>();
    int64_t* cnt = counts.data_ptr<int64_t>();
    at::parallel_for(0, B, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        NtxState<T>& a = st[i];
        std::sort(a.pos.begin(), a.pos.end());  // column order, as the general op sums
        const T m = a.neg.m, s = a.neg.s;
        T total = T(0), w = T(0);
        int64_t kept = 0;
        for (const auto& [j, z] : a.pos) {
          const NtxProb<T> p = ntx_prob(z, m, s);
          const T loss = ntx_loss(p);
          if (in_window(loss, lo, hi)) {
            total += loss;
            w += ntx_pos_weight(p);
            ++kept;
          }
        }
        out[i] = total;
        cnt[i] = kept;
        nm[i] = m;
        ns[i] = s;
        wt[i] = w;
      }
    });
  });
  return {sums, counts, neg_max, neg_sum, w_total};
}

at::Tensor ntxent_self_bwd_cpu(const at::Tensor& grad_sums, const at::Tensor& x_,
                               const at::Tensor& labels, const at::Tensor& neg_max_,
                               const at::Tensor& neg_sum_, const at::Tensor& w_total_,
                               double temperature, double low, double high, int64_t block) {
  check_self_inputs(x_, labels, block);
  check_temperature_ntx(temperature);
  auto x = x_.contiguous();
  const auto v = row_vectors(x, {{&grad_sums, "grad_sums"}, {&neg_max_, "neg_max"},
                                 {&neg_sum_, "neg_sum"}, {&w_total_, "w_total"}});
  const at::Tensor ids = ms_label_ids(labels);
  at::Tensor dx = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ntxent_self_bwd_cpu", [&] {
    using T = scalar_t;
    const T t = T(temperature), lo = T(low), hi = T(high);
    const int32_t* id = ids.data_ptr<int32_t>();
    const T *g = v[0].data_ptr<T>(), *nm = v[1].data_ptr<T>(), *ns = v[2].data_ptr<T>();
    const T* wt = v[3].data_ptr<T>();
    walk_grad<T>(Walk{x, x, true, block}, dx, dx, [&](T* s, int64_t nc, int64_t i, int64_t c0) {
      ntxent_grad_piece(s, nc, id[i], id + c0, i - c0, t, g[i] / t, nm[i], ns[i], wt[i], lo, hi,
                        scratch_row<T>(nc));
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // ntxent_fwd/ntxent_bwd of the batch against itself (self pairs excluded) over the
  // symmetric blocks of S, `block` rows each; the forward also gives each anchor's Σ w_p over
  // its kept pairs (w_total), which the backward takes
  m.def("ntxent_self_fwd(Tensor x, Tensor labels, float temperature, float low, float high, "
        "int block) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ntxent_self_bwd(Tensor grad_sums, Tensor x, Tensor labels, Tensor neg_max, "
        "Tensor neg_sum, Tensor w_total, float temperature, float low, float high, int block) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ntxent_self_fwd", &ntxent_self_fwd_cpu);
  m.impl("ntxent_self_bwd", &ntxent_self_bwd_cpu);
}

}  // namespace metrix_ops
