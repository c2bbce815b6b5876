// Fused multi-similarity loss on the CPU: per-anchor loss terms of unit anchors x (B×D)
// against unit references r (M×D), streaming S = x rᵀ in chunks of r; never B×M.
//
// Forward keeps only each row's two log-sum-exps; backward recomputes each chunk of S and
// turns it into the chunk of G = ∂L/∂S, then dx += G r_c and dr_c = Gᵀ x. Recomputing costs
// one extra chunk product (4 products in all against the floor of 3: S, G r, Gᵀ x); keeping
// S or G instead would be the B×M memory this op exists to avoid.
#include <limits>

#include <torch/library.h>

#include "cpu/ms_blocks.h"

namespace metrix_ops {

namespace {

// The miner's thresholds as MsMiner pointers (undefined tensors: no miner)
template <typename T>
MsMiner<T> miner_of(const at::Tensor& hardest_neg, const at::Tensor& hardest_pos, double eps,
                    int64_t* kept) {
  if (!hardest_neg.defined()) return {};
  return {hardest_neg.data_ptr<T>(), hardest_pos.data_ptr<T>(), T(eps), kept};
}

// Forward of both ops: rows, the two log-sum-exps and, with the miner, each row's kept
// (positive, negative) pair counts (B×2; 0×2 without it)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_forward(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, const at::Tensor& hardest_neg, const at::Tensor& hardest_pos,
    bool exclude_diag, double alpha, double beta, double base, double eps, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  const int64_t B = x.size(0), M = r.size(0);
  const bool mining = hardest_neg.defined();
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::zeros({B}, x.options()), lse_neg = at::zeros({B}, x.options());
  at::Tensor kept = at::zeros({mining ? B : 0, 2}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    const BlockLabels lab{ids.first.data_ptr<int32_t>(), ids.second.data_ptr<int32_t>(), exclude_diag};
    const MsMiner<T> mine = miner_of<T>(hardest_neg, hardest_pos, eps, kept.data_ptr<int64_t>());
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
      ms_fold_block<T>(s.data_ptr<T>(), B, len, 0, start, lab, T(alpha), T(beta), T(base),
                       pos.data(), neg.data(), false, mine);
    }
    ms_finish_rows<T>(pos, neg, T(alpha), T(beta), rows, lse_pos, lse_neg);
  });
  return {rows, lse_pos, lse_neg, kept};
}

std::tuple<at::Tensor, at::Tensor> ms_backward(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, const at::Tensor& hardest_neg, const at::Tensor& hardest_pos,
    bool exclude_diag, double alpha, double beta, double base, double eps, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  check_vec(grad_rows_, x_.size(0), "grad_rows");
  check_vec(lse_pos_, x_.size(0), "lse_pos");
  check_vec(lse_neg_, x_.size(0), "lse_neg");
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  auto g_rows = grad_rows_.to(x.scalar_type()).contiguous();
  auto lse_pos = lse_pos_.contiguous(), lse_neg = lse_neg_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_loss_bwd_cpu", [&] {
    using T = scalar_t;
    const BlockLabels lab{ids.first.data_ptr<int32_t>(), ids.second.data_ptr<int32_t>(), exclude_diag};
    const MsMiner<T> mine = miner_of<T>(hardest_neg, hardest_pos, eps, nullptr);
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor rc = r.narrow(0, start, len);
      at::Tensor s = at::mm(x, rc.t()).contiguous();  // becomes G in place
      ms_grad_block<T>(s.data_ptr<T>(), B, len, 0, start, lab, g_rows.data_ptr<T>(),
                       lse_pos.data_ptr<T>(), lse_neg.data_ptr<T>(), T(alpha), T(beta), T(base),
                       false, mine);
      dx.addmm_(s, rc);
      dr.narrow(0, start, len).addmm_(s.t(), x);
    }
  });
  return {dx, dr};
}

// The miner's thresholds: both must be rows of x's dtype, one per anchor
void check_thresholds(const at::Tensor& x, const at::Tensor& hardest_neg,
                      const at::Tensor& hardest_pos) {
  check_vec(hardest_neg, x.size(0), "hardest_neg");
  check_vec(hardest_pos, x.size(0), "hardest_pos");
  TORCH_CHECK(hardest_neg.scalar_type() == x.scalar_type() &&
                  hardest_pos.scalar_type() == x.scalar_type(),
              "hardest_neg and hardest_pos must have x's dtype ", x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_loss_fwd_cpu(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  auto out = ms_forward(x, r, labels, ref_labels, {}, {}, exclude_diag, alpha, beta, base, 0.0,
                        chunk);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

std::tuple<at::Tensor, at::Tensor> ms_loss_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, bool exclude_diag, double alpha, double beta, double base,
    int64_t chunk) {
  return ms_backward(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg, {}, {}, exclude_diag,
                     alpha, beta, base, 0.0, chunk);
}

// MultiSimilarityMiner, first pass: each anchor's hardest negative (largest s over its
// negatives; −inf without one) and hardest positive (smallest s over its positives; +inf
// without one), streamed over r.
std::tuple<at::Tensor, at::Tensor> ms_mine_bounds_cpu(const at::Tensor& x_, const at::Tensor& r_,
                                                      const at::Tensor& labels_,
                                                      const at::Tensor& ref_labels_,
                                                      bool exclude_diag, int64_t chunk) {
  check_pair_inputs(x_, r_, labels_, ref_labels_, chunk);
  auto x = x_.contiguous(), r = r_.contiguous();
  const auto ids = ms_label_ids(labels_, ref_labels_);
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor hn = at::full({B}, -std::numeric_limits<double>::infinity(), x.options());
  at::Tensor hp = at::full({B}, std::numeric_limits<double>::infinity(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mine_bounds_cpu", [&] {
    using T = scalar_t;
    const int32_t* yr = ids.first.data_ptr<int32_t>();
    const int32_t* yc = ids.second.data_ptr<int32_t>();
    T* neg = hn.data_ptr<T>();
    T* pos = hp.data_ptr<T>();
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      at::Tensor st = at::mm(x, r.narrow(0, start, len).t()).contiguous();
      const T* s = st.data_ptr<T>();
      at::parallel_for(0, B, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T n = neg[i], p = pos[i];
          for (int64_t j = 0; j < len; ++j) {
            const T v = s[i * len + j];
            if (yc[start + j] != yr[i]) n = v > n ? v : n;
            else if (!(exclude_diag && start + j == i)) p = v < p ? v : p;
          }
          neg[i] = n;
          pos[i] = p;
        }
      });
    }
  });
  return {hn, hp};
}

// MS loss on the pairs the miner keeps (thresholds from ms_mine_bounds, maybe shifted)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_mined_fwd_cpu(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, const at::Tensor& hardest_neg, const at::Tensor& hardest_pos,
    bool exclude_diag, double alpha, double beta, double base, double eps, int64_t chunk) {
  check_thresholds(x, hardest_neg, hardest_pos);
  return ms_forward(x, r, labels, ref_labels, hardest_neg.contiguous(), hardest_pos.contiguous(),
                    exclude_diag, alpha, beta, base, eps, chunk);
}

std::tuple<at::Tensor, at::Tensor> ms_mined_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, const at::Tensor& hardest_neg, const at::Tensor& hardest_pos,
    bool exclude_diag, double alpha, double beta, double base, double eps, int64_t chunk) {
  check_thresholds(x, hardest_neg, hardest_pos);
  return ms_backward(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg,
                     hardest_neg.contiguous(), hardest_pos.contiguous(), exclude_diag, alpha,
                     beta, base, eps, chunk);
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // MultiSimilarityMiner inside the MS op: the anchors' hardest negative and positive, then
  // the loss over the pairs PML's miner keeps (s − eps < hardest_neg, s + eps > hardest_pos)
  // with each row's kept pair counts (B×2, int64)
  m.def("ms_mine_bounds(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "bool exclude_diag, int chunk) -> (Tensor, Tensor)");
  m.def("ms_mined_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, Tensor hardest_neg, "
        "Tensor hardest_pos, bool exclude_diag, float alpha, float beta, float base, float eps, "
        "int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ms_mined_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor lse_pos, Tensor lse_neg, Tensor hardest_neg, Tensor hardest_pos, "
        "bool exclude_diag, float alpha, float beta, float base, float eps, int chunk) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_loss_fwd", &ms_loss_fwd_cpu);
  m.impl("ms_loss_bwd", &ms_loss_bwd_cpu);
  m.impl("ms_mine_bounds", &ms_mine_bounds_cpu);
  m.impl("ms_mined_fwd", &ms_mined_fwd_cpu);
  m.impl("ms_mined_bwd", &ms_mined_bwd_cpu);
}

}  // namespace metrix_ops
