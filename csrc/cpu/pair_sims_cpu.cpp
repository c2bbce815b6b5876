// Similarities of listed pairs on the CPU: s_k = x[rows_k] · r[cols_k] for the P pairs of an
// indices_tuple, without the B×M matrix and without a P×D gather (each dot product reads the
// two rows in place). The losses over an indices_tuple need only these P values.
//
// Backward: dx[i] = Σ_{k: rows_k = i} g_k r[cols_k] and dr[j] = Σ_{k: cols_k = j} g_k x[rows_k].
// A parallel scatter over pairs would race (or need atomics, whose summation order, hence
// the rounding, changes from run to run). Instead the pairs are bucketed by row (and by
// column) with a stable counting sort (CSR, O(P + B) memory), and each output row is summed
// by one thread in the pairs' own order: the result is bitwise identical whatever the number
// of threads, and no thread-private B×D buffers are needed.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"  // check_pair_sims_inputs
#include "cpu/op_checks.h"
#include "cpu/row_gather.h"
#include "common/op_tags.h"

namespace metrix_ops {

at::Tensor pair_sims_fwd_cpu(const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& rows_,
                             const at::Tensor& cols_) {
  check_pair_sims_inputs(x_, r_, rows_, cols_);
  auto x = x_.contiguous(), r = r_.contiguous(), rows = rows_.contiguous(), cols = cols_.contiguous();
  const int64_t P = rows.size(0), D = x.size(1);
  at::Tensor out = at::empty({P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_sims_fwd_cpu", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *rp = r.data_ptr<T>();
    const int64_t *ri = rows.data_ptr<int64_t>(), *ci = cols.data_ptr<int64_t>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, P, pair_grain(D), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) o[k] = row_dot(xp + ri[k] * D, rp + ci[k] * D, D);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_sims_bwd_cpu(const at::Tensor& grad_, const at::Tensor& x_,
                                                     const at::Tensor& r_, const at::Tensor& rows_,
                                                     const at::Tensor& cols_) {
  check_pair_sims_inputs(x_, r_, rows_, cols_);
  check_vec(grad_, rows_.size(0), "grad");
  auto x = x_.contiguous(), r = r_.contiguous(), rows = rows_.contiguous(), cols = cols_.contiguous();
  auto g = grad_.to(x.scalar_type()).contiguous();
  const int64_t P = rows.size(0), D = x.size(1), B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  const int64_t *ri = rows.data_ptr<int64_t>(), *ci = cols.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_sims_bwd_cpu", [&] {
    using T = scalar_t;
    const T* gp = g.data_ptr<T>();
    gather_rows(dx.data_ptr<T>(), r.data_ptr<T>(), Buckets<T>(ri, ci, gp, P, B), B, D);
    gather_rows(dr.data_ptr<T>(), x.data_ptr<T>(), Buckets<T>(ci, ri, gp, P, M), M, D);
  });
  return {dx, dr};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // s_k = x[rows_k] · r[cols_k] for P listed pairs (the pairs of an indices_tuple)
  m.def("pair_sims_fwd(Tensor x, Tensor r, Tensor rows, Tensor cols) -> Tensor",
        METRIX_HOST_READS);
  m.def("pair_sims_bwd(Tensor grad, Tensor x, Tensor r, Tensor rows, Tensor cols) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("pair_sims_fwd", &pair_sims_fwd_cpu);
  m.impl("pair_sims_bwd", &pair_sims_bwd_cpu);
}

}  // namespace metrix_ops
