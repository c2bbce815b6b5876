// CPU sim_row_stats: chunked matrix products (BLAS through ATen) and per-row streaming
// statistics, parallel over rows. Peak extra memory O(B·D + chunk·D + B·chunk): r is
// normalised (and fp16/bf16 upcast) one chunk at a time, so a large bank is never copied.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/row_state.h"

namespace metrix_ops {

namespace {

// Each row of a chunk is folded the way the CUDA kernel's warp does it: 32 interleaved
// partial states (lane l takes columns l, l+32, ...), merged by the same halving tree as
// the warp's shuffles, then merged into the row's running state. So every CPU test runs
// the merge paths (ties across lanes and chunks, empty lanes) that the GPU depends on, and
// the 32 independent accumulators also break the loop-carried dependency of one running sum.
constexpr int kLanes = 32;

template <typename T>
inline void fold_row(const T* row, int64_t len, int64_t start, T scale, RowState<T>& st) {
  RowState<T> lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = RowState<T>::empty();
  int64_t j0 = 0;
  for (; j0 + kLanes <= len; j0 += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l].push(scale * row[j0 + l], start + j0 + l);
  for (int l = 0; j0 + l < len; ++l) lane[l].push(scale * row[j0 + l], start + j0 + l);
  for (int offset = kLanes / 2; offset > 0; offset >>= 1)
    for (int l = 0; l < offset; ++l) lane[l].merge(lane[l + offset]);
  st.merge(lane[0]);
}

template <typename T>
void stream_rows(const at::Tensor& xn, const at::Tensor& r, T scale, int64_t chunk,
                 std::vector<RowState<T>>& state) {
  const int64_t B = xn.size(0), M = r.size(0);
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t len = std::min(chunk, M - start);
    // The scale is applied while folding, not on the chunk: one pass over B×len less.
    const at::Tensor s = at::mm(xn, normalize_rows(r.narrow(0, start, len)).t()).contiguous();
    const T* sp = s.data_ptr<T>();
    // Rows are independent; a grain of 16 rows keeps the per-task overhead small next to
    // 16·len exponentials.
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) fold_row(sp + i * len, len, start, scale, state[i]);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sim_row_stats_cpu(const at::Tensor& x,
                                                                   const at::Tensor& r,
                                                                   double scale, int64_t chunk) {
  check_sim_inputs(x, r, scale, chunk);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  const auto acc = acc_type(x);
  const int64_t B = x.size(0);
  auto opts = x.options().dtype(acc);
  at::Tensor out_max = at::empty({B}, opts), out_lse = at::empty({B}, opts);
  at::Tensor out_arg = at::empty({B}, x.options().dtype(at::kLong));
  // fp16/bf16 are upcast (per chunk) to fp32: CPU BLAS has no fast half GEMM to gain from.
  AT_DISPATCH_FLOATING_TYPES(acc, "sim_row_stats_cpu", [&] {
    std::vector<RowState<scalar_t>> state(B, RowState<scalar_t>::empty());
    if (B > 0 && r.size(0) > 0)
      stream_rows<scalar_t>(normalize_rows(x), r, static_cast<scalar_t>(scale), chunk, state);
    auto* mx = out_max.data_ptr<scalar_t>();
    auto* ls = out_lse.data_ptr<scalar_t>();
    auto* ag = out_arg.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      mx[i] = state[i].max.best;
      ag[i] = state[i].max.arg;
      ls[i] = state[i].lse.value();
    }
  });
  return {out_max, out_arg, out_lse};
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) { m.impl("sim_row_stats", &sim_row_stats_cpu); }

}  // namespace metrix_ops
