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
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/op_checks.h"

namespace metrix_ops {
namespace {

void check_pair_sims_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& rows,
                            const at::Tensor& cols) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (B, D), got ", x.dim(), "-D");
  TORCH_CHECK(r.dim() == 2, "r must be 2-D (M, D), got ", r.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64 (half inputs are upcast before the op), got ",
              x.scalar_type());
  TORCH_CHECK(x.scalar_type() == r.scalar_type(), "x and r must have the same dtype, got ",
              x.scalar_type(), " and ", r.scalar_type());
  TORCH_CHECK(x.size(1) == r.size(1), "x and r must have the same D, got ", x.size(1), " and ",
              r.size(1));
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be 1-D int64");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong, "cols must be 1-D int64");
  TORCH_CHECK(rows.size(0) == cols.size(0), "rows and cols must have the same length, got ",
              rows.size(0), " and ", cols.size(0));
  if (rows.numel()) {
    const int64_t lo = rows.min().item<int64_t>(), hi = rows.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < x.size(0), "rows must be in [0, ", x.size(0), "), got values in [",
                lo, ", ", hi, "]");
    const int64_t clo = cols.min().item<int64_t>(), chi = cols.max().item<int64_t>();
    TORCH_CHECK(clo >= 0 && chi < r.size(0), "cols must be in [0, ", r.size(0),
                "), got values in [", clo, ", ", chi, "]");
  }
}

// pairs per parallel task: about 32k multiply-adds
inline int64_t pair_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

// Eight partial sums in a fixed order: the compiler may not reorder a floating-point sum
// (no -ffast-math), so a single accumulator would run one scalar add per element; eight
// independent lanes vectorise, and the result still does not depend on threads or tiling.
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t D) {
  constexpr int L = 8;
  T acc[L] = {};  // T: fp32 for fp32, fp64 for fp64
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int l = 0; l < L; ++l) acc[l] += a[d + l] * b[d + l];
  T tail = 0;
  for (; d < D; ++d) tail += a[d] * b[d];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// The pairs bucketed by key (a stable counting sort, O(P + n)): bucket i holds the pairs
// with key i, in their order in the list, as (other end, incoming gradient) copied into
// bucket order, so that the hot loop reads them sequentially instead of gathering two
// scattered values per pair.
template <typename T>
struct Buckets {
  std::vector<int64_t> off, other;
  std::vector<T> grad;
  Buckets(const int64_t* key, const int64_t* other_end, const T* g, int64_t P, int64_t n)
      : off(n + 1, 0), other(P), grad(P) {
    for (int64_t k = 0; k < P; ++k) ++off[key[k] + 1];
    for (int64_t i = 0; i < n; ++i) off[i + 1] += off[i];
    std::vector<int64_t> at(off.begin(), off.end() - 1);
    for (int64_t k = 0; k < P; ++k) {
      const int64_t q = at[key[k]]++;
      other[q] = other_end[k];
      grad[q] = g[k];
    }
  }
};

// out[i] = Σ_{pairs q in bucket i} grad_q · src[other_q], one output row per task
template <typename T>
void gather_rows(T* out, const T* src, const Buckets<T>& b, int64_t n, int64_t D) {
  const int64_t per = std::max<int64_t>(1, int64_t(b.other.size()) / std::max<int64_t>(n, 1));
  at::parallel_for(0, n, std::max<int64_t>(1, pair_grain(D) / per), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* __restrict o = out + i * D;
      for (int64_t q = b.off[i]; q < b.off[i + 1]; ++q) {
        const T gq = b.grad[q];
        const T* __restrict s = src + b.other[q] * D;
        for (int64_t d = 0; d < D; ++d) o[d] += gq * s[d];
      }
    }
  });
}

}  // namespace

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
      for (int64_t k = k0; k < k1; ++k) o[k] = dot(xp + ri[k] * D, rp + ci[k] * D, D);
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
  m.def("pair_sims_fwd(Tensor x, Tensor r, Tensor rows, Tensor cols) -> Tensor");
  m.def("pair_sims_bwd(Tensor grad, Tensor x, Tensor r, Tensor rows, Tensor cols) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("pair_sims_fwd", &pair_sims_fwd_cpu);
  m.impl("pair_sims_bwd", &pair_sims_bwd_cpu);
}

}  // namespace metrix_ops
