// Rows scaled to unit L2 norm on the CPU, F.normalize(x, dim=1)'s value (eps 1e-12), and its
// gradient dx = (g − y (y·g)) / max(‖x‖, eps), each in one pass over the rows: the PyTorch
// form is about ten small ops a call (a norm, a clamp, a division; a vecdot, a mask, an
// addcmul, a division, ...), which at small batches cost more than the arithmetic and at large
// ones read B×D several times. Where the norm was clamped (a row under eps) F.normalize's
// clamp_min passes no gradient to the norm, so there dx = g / eps: the projection is dropped.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>

#include "cpu/row_gather.h"  // row_dot, pair_grain

namespace metrix_ops {

namespace {

constexpr double kEps = 1e-12;  // F.normalize's

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D (rows, D), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, name,
              " must be float32 or float64 (other dtypes take the PyTorch form), got ",
              x.scalar_type());
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), name,
              " must have y's shape and dtype, got ", t.sizes(), " ", t.scalar_type());
}

}  // namespace

// (y, norm): y = x / max(‖x‖, eps) and norm = ‖x‖ (B×1, unclamped, as the backward needs)
std::tuple<at::Tensor, at::Tensor> unit_rows_fwd_cpu(const at::Tensor& x_) {
  check_rows(x_, "x");
  const auto x = x_.contiguous();
  const int64_t B = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x), norm = at::empty({B, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unit_rows_fwd_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T *yp = y.data_ptr<T>(), *np = norm.data_ptr<T>();
    at::parallel_for(0, B, pair_grain(D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* xi = xp + i * D;
        T* yi = yp + i * D;
        const T n = std::sqrt(row_dot(xi, xi, D));
        const T den = std::max(n, T(kEps));
        for (int64_t d = 0; d < D; ++d) yi[d] = xi[d] / den;
        np[i] = n;
      }
    });
  });
  return {y, norm};
}

// dx from the incoming gradient g of y, the saved y and the unclamped norms
at::Tensor unit_rows_bwd_cpu(const at::Tensor& g_, const at::Tensor& y_, const at::Tensor& norm_) {
  check_rows(y_, "y");
  check_like(g_, y_, "grad");
  TORCH_CHECK(norm_.numel() == y_.size(0) && norm_.scalar_type() == y_.scalar_type(),
              "norm must hold one value per row of y in y's dtype, got shape ", norm_.sizes(),
              " ", norm_.scalar_type());
  const auto g = g_.contiguous(), y = y_.contiguous(), norm = norm_.contiguous();
  const int64_t B = y.size(0), D = y.size(1);
  at::Tensor dx = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "unit_rows_bwd_cpu", [&] {
    using T = scalar_t;
    const T *gp = g.data_ptr<T>(), *yp = y.data_ptr<T>(), *np = norm.data_ptr<T>();
    T* dp = dx.data_ptr<T>();
    at::parallel_for(0, B, pair_grain(D), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T *gi = gp + i * D, *yi = yp + i * D;
        T* di = dp + i * D;
        const bool clamped = np[i] < T(kEps);
        const T dot = clamped ? T(0) : row_dot(gi, yi, D);
        const T den = std::max(np[i], T(kEps));
        for (int64_t d = 0; d < D; ++d) di[d] = (gi[d] - yi[d] * dot) / den;
      }
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // F.normalize(x, dim=1) and the norms; its gradient from (grad of y, y, norm)
  m.def("unit_rows_fwd(Tensor x) -> (Tensor, Tensor)");
  m.def("unit_rows_bwd(Tensor grad, Tensor y, Tensor norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("unit_rows_fwd", &unit_rows_fwd_cpu);
  m.impl("unit_rows_bwd", &unit_rows_bwd_cpu);
}

}  // namespace metrix_ops
