// Fused SupConLoss of a batch against itself (no ref_emb: the common case) on the CPU: the
// blocks I <= J of the symmetric S = x xᵀ once (self_walk.h), each block's rows folded into
// the anchors' states and, off the diagonal, its transposed copy into the column anchors'
// (supcon_rows.h). The general op (ntxent_cpu.cpp) streams whole rows: 1 product forward and
// 3 backward where this takes ½ and 1½, with the same per-pair exponentials.
//
// The general op shifts a row's logits by their max over every column before its sums, as
// PML; folded piece by piece there is no row max until the end, so the state keeps
// log Σ e^z online and Σ z over the positives, and the loss is L − Σ z / n_pos (the same
// value, rounded differently: within the reference tests' tolerances).
#include <torch/library.h>

#include <unordered_map>
#include <vector>

#include "cpu/self_walk.h"
#include "cpu/supcon_rows.h"

namespace metrix_ops {

namespace {

void check_temperature_self(double t) {
  TORCH_CHECK(t != 0 && std::isfinite(t), "temperature must be finite and nonzero, got ", t);
}

// per anchor, the other rows with its label (its positives against the batch itself)
std::vector<int64_t> positives_per_row(const at::Tensor& ids) {
  const int32_t* id = ids.data_ptr<int32_t>();
  const int64_t B = ids.size(0);
  std::unordered_map<int32_t, int64_t> count;
  for (int64_t i = 0; i < B; ++i) ++count[id[i]];
  std::vector<int64_t> n(B);
  for (int64_t i = 0; i < B; ++i) n[i] = count[id[i]] - 1;
  return n;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> supcon_self_fwd_cpu(const at::Tensor& x_,
                                                       const at::Tensor& labels,
                                                       double temperature, int64_t block) {
  check_self_inputs(x_, labels, block);
  check_temperature_self(temperature);
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  const int64_t B = x.size(0);
  at::Tensor rows = at::zeros({B}, x.options()), lse = at::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "supcon_self_fwd_cpu", [&] {
    using T = scalar_t;
    const T t = T(temperature);
    const int32_t* id = ids.data_ptr<int32_t>();
    std::vector<SupConState<T>> st(B);
    walk_rows<T>(Walk{x, x, true, block}, [&](const T* s, int64_t nc, int64_t gi, int64_t c0) {
      supcon_fold_piece(s, nc, id[gi], id + c0, gi - c0, t, scratch_row<T>(nc), st[gi]);
    });
    T *out = rows.data_ptr<T>(), *lo = lse.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      lo[i] = st[i].lse.value();  // −inf without pairs (B = 1)
      if (lo[i] > kNegInf<T>) out[i] = supcon_loss(lo[i], st[i].pos_sum, st[i].n_pos);
    }
  });
  return {rows, lse};
}

at::Tensor supcon_self_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x_,
                               const at::Tensor& labels, const at::Tensor& lse_,
                               double temperature, int64_t block) {
  check_self_inputs(x_, labels, block);
  check_temperature_self(temperature);
  auto x = x_.contiguous();
  const auto v = row_vectors(x, {{&grad_rows, "grad_rows"}, {&lse_, "lse"}});
  const at::Tensor ids = ms_label_ids(labels);
  const std::vector<int64_t> n_pos = positives_per_row(ids);
  at::Tensor dx = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "supcon_self_bwd_cpu", [&] {
    using T = scalar_t;
    const T t = T(temperature);
    const int32_t* id = ids.data_ptr<int32_t>();
    const T *g = v[0].data_ptr<T>(), *L = v[1].data_ptr<T>();
    walk_grad<T>(Walk{x, x, true, block}, dx, dx, [&](T* s, int64_t nc, int64_t i, int64_t c0) {
      supcon_grad_piece(s, nc, id[i], id + c0, i - c0, t, g[i], L[i], n_pos[i],
                        scratch_row<T>(nc));
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // supcon_fwd/supcon_bwd of the batch against itself (self pairs excluded) over the
  // symmetric blocks of S, `block` rows each: per anchor its loss and log Σ e^{s/τ} over its
  // pairs (−inf without pairs)
  m.def("supcon_self_fwd(Tensor x, Tensor labels, float temperature, int block) "
        "-> (Tensor, Tensor)");
  m.def("supcon_self_bwd(Tensor grad_rows, Tensor x, Tensor labels, Tensor lse, "
        "float temperature, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("supcon_self_fwd", &supcon_self_fwd_cpu);
  m.impl("supcon_self_bwd", &supcon_self_bwd_cpu);
}

}  // namespace metrix_ops
