// CPU sim_row_stats: chunked matrix products (BLAS through ATen) and per-row streaming
// statistics, parallel over rows. Peak extra memory O((B + M)·D + B·chunk).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/checks.h"
#include "common/row_state.h"

namespace metrix_ops {

namespace {

template <typename T>
void stream_rows(const at::Tensor& xn, const at::Tensor& rn, double scale, int64_t chunk,
                 std::vector<RowState<T>>& state) {
  const int64_t B = xn.size(0), M = rn.size(0);
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t len = std::min(chunk, M - start);
    at::Tensor s = at::mm(xn, rn.narrow(0, start, len).t()).mul_(scale).contiguous();
    const T* sp = s.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        RowState<T>& st = state[i];
        const T* row = sp + i * len;
        for (int64_t j = 0; j < len; ++j) st.push(row[j], start + j);
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sim_row_stats_cpu(const at::Tensor& x,
                                                                   const at::Tensor& r,
                                                                   double scale, int64_t chunk) {
  check_sim_inputs(x, r, chunk);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel");
  const auto acc = acc_type(x);
  const int64_t B = x.size(0);
  auto opts = x.options().dtype(acc);
  at::Tensor out_max = at::empty({B}, opts), out_lse = at::empty({B}, opts);
  at::Tensor out_arg = at::empty({B}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(acc, "sim_row_stats_cpu", [&] {
    std::vector<RowState<scalar_t>> state(B, RowState<scalar_t>::empty());
    if (B > 0 && r.size(0) > 0)
      stream_rows<scalar_t>(normalize_rows(x), normalize_rows(r), scale, chunk, state);
    auto* mx = out_max.data_ptr<scalar_t>();
    auto* ls = out_lse.data_ptr<scalar_t>();
    auto* ag = out_arg.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      mx[i] = state[i].best;
      ag[i] = state[i].arg;
      ls[i] = state[i].lse();
    }
  });
  return {out_max, out_arg, out_lse};
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) { m.impl("sim_row_stats", &sim_row_stats_cpu); }

}  // namespace metrix_ops
