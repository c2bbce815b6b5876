// CUDA sim_row_stats: each chunk's product through cuBLAS (at::mm: tensor cores; bf16/fp16
// inputs multiply in their own type with fp32 accumulation, as under autocast; fp32 uses
// TF32 only if the user allows it), then one warp per row folds the chunk into the row's
// streaming state with the same RowState math as the CPU kernel.
// Per-op ATen headers instead of torch/types.h: nvcc parses everything twice (host and
// device pass), and all of ATen doubles this file's compile time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/row_state.h"

namespace metrix_ops {

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 256 threads: one warp per row

template <typename T>
__device__ __forceinline__ RowState<T> shfl_down(const RowState<T>& v, int offset) {
  RowState<T> o;
  o.lse.m = __shfl_down_sync(0xffffffffu, v.lse.m, offset);
  o.lse.s = __shfl_down_sync(0xffffffffu, v.lse.s, offset);
  o.max.best = __shfl_down_sync(0xffffffffu, v.max.best, offset);
  o.max.arg = __shfl_down_sync(0xffffffffu, static_cast<long long>(v.max.arg), offset);
  return o;
}

// Folds columns [start, start + len) of every row. The chunk's S is read once, in its own
// dtype (half the bytes for bf16/fp16), with the scale applied here rather than by a
// separate elementwise pass. The first chunk starts from the empty state instead of a
// stored one and the last writes the outputs, so no init/finish kernels are needed.
template <typename scalar_t, typename acc_t>
__global__ void fold_chunk_kernel(const scalar_t* __restrict__ s, int64_t rows, int64_t len,
                                  int64_t start, acc_t scale, bool first, bool last,
                                  RowState<acc_t>* __restrict__ state, acc_t* __restrict__ out_max,
                                  int64_t* __restrict__ out_arg, acc_t* __restrict__ out_lse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  // The whole warp leaves together, so the full-mask shuffles below stay valid.
  if (row >= rows) return;
  const scalar_t* srow = s + row * len;
  // Lanes stride over the row so each load instruction of the warp is coalesced; each lane
  // still sees its columns in increasing order, and merge() breaks ties across lanes by index.
  RowState<acc_t> local = RowState<acc_t>::empty();
  for (int64_t j = lane; j < len; j += kWarp)
    local.push(scale * static_cast<acc_t>(srow[j]), start + j);
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) local.merge(shfl_down(local, offset));
  if (lane != 0) return;
  if (!first) {
    RowState<acc_t> st = state[row];
    st.merge(local);
    local = st;
  }
  if (last) {
    out_max[row] = local.max.best;
    out_arg[row] = local.max.arg;
    out_lse[row] = local.lse.value();
  } else {
    state[row] = local;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sim_row_stats_cuda(const at::Tensor& x,
                                                                    const at::Tensor& r,
                                                                    double scale, int64_t chunk) {
  check_sim_inputs(x, r, scale, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  const int64_t B = x.size(0), M = r.size(0);
  auto opts = x.options().dtype(acc);
  at::Tensor out_max = at::empty({B}, opts), out_lse = at::empty({B}, opts);
  at::Tensor out_arg = at::empty({B}, x.options().dtype(at::kLong));
  if (B == 0) return {out_max, out_arg, out_lse};
  if (M == 0) {
    out_max.fill_(-std::numeric_limits<double>::infinity());
    out_lse.fill_(-std::numeric_limits<double>::infinity());
    out_arg.fill_(-1);
    return {out_max, out_arg, out_lse};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks64 = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks64 <= std::numeric_limits<int>::max(), "x has too many rows: ", B);
  const unsigned blocks = static_cast<unsigned>(blocks64);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sim_row_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using State = RowState<acc_t>;
    // Only needed between chunks; a single-chunk call never touches it.
    at::Tensor state_buf;
    State* state = nullptr;
    if (M > chunk) {
      state_buf = at::empty({B * static_cast<int64_t>(sizeof(State))}, x.options().dtype(at::kByte));
      state = reinterpret_cast<State*>(state_buf.data_ptr());
    }
    // Normalised in fp32/fp64, then rounded back to the input dtype for the product.
    const at::Tensor xn = normalize_rows(x).to(x.scalar_type());
    for (int64_t start = 0; start < M; start += chunk) {
      const int64_t len = std::min(chunk, M - start);
      const at::Tensor rc = normalize_rows(r.narrow(0, start, len)).to(x.scalar_type());
      const at::Tensor s = at::mm(xn, rc.t()).contiguous();
      fold_chunk_kernel<scalar_t, acc_t><<<blocks, kRowsPerBlock * kWarp, 0, stream>>>(
          s.data_ptr<scalar_t>(), B, len, start, static_cast<acc_t>(scale), start == 0,
          start + len >= M, state, out_max.data_ptr<acc_t>(), out_arg.data_ptr<int64_t>(),
          out_lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out_max, out_arg, out_lse};
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) { m.impl("sim_row_stats", &sim_row_stats_cuda); }

}  // namespace metrix_ops
