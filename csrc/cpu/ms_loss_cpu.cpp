// Fused multi-similarity loss on the CPU: per-anchor loss terms of unit anchors x (B×D)
// against unit references r (M×D), streaming S = x rᵀ in chunks of r; never B×M.
//
// Forward keeps only each row's two log-sum-exps; backward recomputes each chunk of S and
// turns it into the chunk of G = ∂L/∂S, then dx += G r_c and dr_c = Gᵀ x. Recomputing costs
// one extra chunk product (4 products in all against the floor of 3: S, G r, Gᵀ x); keeping
// S or G instead would be the B×M memory this op exists to avoid.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/lse_acc.h"

namespace metrix_ops {

namespace {

void check_ms_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                     const at::Tensor& ref_labels, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2 && r.dim() == 2, "x and r must be 2-D");
  TORCH_CHECK(x.size(1) == r.size(1), "x and r must have the same D");
  TORCH_CHECK(x.scalar_type() == r.scalar_type(), "x and r must have the same dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64 (half inputs are upcast before the op)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "labels must be (B,)");
  TORCH_CHECK(ref_labels.dim() == 1 && ref_labels.size(0) == r.size(0), "ref_labels must be (M,)");
  TORCH_CHECK(labels.scalar_type() == at::kLong && ref_labels.scalar_type() == at::kLong,
              "labels must be int64");
  TORCH_CHECK(chunk > 0, "chunk must be > 0");
}

// Calls f(i, j_global, s, is_pos) for every pair of the chunk that enters the loss.
template <typename T, typename F>
void for_pairs(const T* s, int64_t i, int64_t len, int64_t start, const int64_t* lab,
               const int64_t* rlab, bool exclude_diag, F&& f) {
  const int64_t li = lab[i];
  const T* row = s + i * len;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t jg = start + j;
    if (exclude_diag && jg == i) {
      continue;  // the self pair is in neither set when the references are the batch
    }
    f(jg, row[j], rlab[jg] == li);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_loss_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  check_ms_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::zeros({B}, x.options()), lse_neg = at::zeros({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    const int64_t* lab = labels.data_ptr<int64_t>();
    const int64_t* rlab = ref_labels.data_ptr<int64_t>();
    const T a = alpha, bt = beta, bs = base;
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
      const T* sp = s.data_ptr<T>();
      at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i)
          for_pairs<T>(sp, i, len, start, lab, rlab, exclude_diag, [&](int64_t, T v, bool is_pos) {
            if (is_pos) pos[i].push(ms_pos_arg(v, a, bs));
            else neg[i].push(ms_neg_arg(v, bt, bs));
          });
      });
    }
    T* out = rows.data_ptr<T>();
    T* lp = lse_pos.data_ptr<T>();
    T* ln = lse_neg.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      lp[i] = pos[i].value();  // log(1 + Σ): 0 for a row with no pair, as PML's masked lse
      ln[i] = neg[i].value();
      out[i] = lp[i] / a + ln[i] / bt;
    }
  });
  return {rows, lse_pos, lse_neg};
}

std::tuple<at::Tensor, at::Tensor> ms_loss_bwd_cpu(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  check_ms_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g_rows = grad_rows_.to(x.scalar_type()).contiguous();
  auto lse_pos = lse_pos_.contiguous(), lse_neg = lse_neg_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_bwd_cpu", [&] {
    using T = scalar_t;
    const int64_t* lab = labels.data_ptr<int64_t>();
    const int64_t* rlab = ref_labels.data_ptr<int64_t>();
    const T* gr = g_rows.data_ptr<T>();
    const T* lp = lse_pos.data_ptr<T>();
    const T* ln = lse_neg.data_ptr<T>();
    const T a = alpha, bt = beta, bs = base;
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor rc = r.narrow(0, start, len);
      at::Tensor s = at::mm(x, rc.t()).contiguous();  // becomes G in place
      T* sp = s.data_ptr<T>();
      at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          T* row = sp + i * len;
          const T g = gr[i];
          const int64_t li = lab[i];
          for (int64_t j = 0; j < len; ++j) {
            const int64_t jg = start + j;
            T v = row[j];
            if (exclude_diag && jg == i) row[j] = T(0);
            else if (rlab[jg] == li) row[j] = g * ms_pos_grad(v, a, bs, lp[i]);
            else row[j] = g * ms_neg_grad(v, bt, bs, ln[i]);
          }
        }
      });
      dx.addmm_(s, rc);
      dr.narrow(0, start, len).addmm_(s.t(), x);
    }
  });
  return {dx, dr};
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_loss_fwd", &ms_loss_fwd_cpu);
  m.impl("ms_loss_bwd", &ms_loss_bwd_cpu);
}

}  // namespace metrix_ops
