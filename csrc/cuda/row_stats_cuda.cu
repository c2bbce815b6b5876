// CUDA sim_row_stats (the version run and timed on an H100, benchmarks/results/row_stats_h100.json): each chunk's product through cuBLAS (at::mm: tensor cores, TF32 if the
// user allows it), then one block per row folds the chunk into the row's streaming state
// with the same RowState math as the CPU kernel. State lives in device memory between chunks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/checks.h"
#include "common/row_state.h"

namespace metrix_ops {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void fold_chunk_kernel(const T* __restrict__ s, int64_t len, int64_t start,
                                  RowState<T>* __restrict__ state) {
  const int64_t row = blockIdx.x;
  const T* srow = s + row * len;
  // Strided so a warp reads consecutive columns (coalesced); each thread still sees its
  // columns in increasing order, and merge() breaks ties across threads by index.
  RowState<T> local = RowState<T>::empty();
  for (int64_t j = threadIdx.x; j < len; j += kThreads) local.push(srow[j], start + j);

  __shared__ RowState<T> shared[kThreads];
  shared[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x].merge(shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) state[row].merge(shared[0]);
}

template <typename T>
__global__ void init_kernel(RowState<T>* state, int64_t n) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) state[i] = RowState<T>::empty();
}

template <typename T>
__global__ void finish_kernel(const RowState<T>* state, int64_t n, T* mx, int64_t* ag, T* ls) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) {
    mx[i] = state[i].max.best;
    ag[i] = state[i].max.arg;
    ls[i] = state[i].lse.value();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sim_row_stats_cuda(const at::Tensor& x,
                                                                    const at::Tensor& r,
                                                                    double scale, int64_t chunk) {
  check_sim_inputs(x, r, scale, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel");
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  const int64_t B = x.size(0), M = r.size(0);
  auto opts = x.options().dtype(acc);
  at::Tensor out_max = at::empty({B}, opts), out_lse = at::empty({B}, opts);
  at::Tensor out_arg = at::empty({B}, x.options().dtype(at::kLong));
  if (B == 0) return {out_max, out_arg, out_lse};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "sim_row_stats_cuda", [&] {
    using State = RowState<scalar_t>;
    at::Tensor state_buf = at::empty({B * (int64_t)sizeof(State)}, x.options().dtype(at::kByte));
    State* state = reinterpret_cast<State*>(state_buf.data_ptr());
    const int blocks = (int)((B + kThreads - 1) / kThreads);
    init_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(state, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (M > 0) {
      at::Tensor xn = normalize_rows(x), rn = normalize_rows(r);
      for (int64_t start = 0; start < M; start += chunk) {
        const int64_t len = std::min(chunk, M - start);
        at::Tensor s = at::mm(xn, rn.narrow(0, start, len).t()).mul_(scale).contiguous();
        fold_chunk_kernel<scalar_t><<<(unsigned)B, kThreads, 0, stream>>>(
            s.data_ptr<scalar_t>(), len, start, state);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    finish_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        state, B, out_max.data_ptr<scalar_t>(), out_arg.data_ptr<int64_t>(),
        out_lse.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_max, out_arg, out_lse};
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) { m.impl("sim_row_stats", &sim_row_stats_cuda); }

}  // namespace metrix_ops
