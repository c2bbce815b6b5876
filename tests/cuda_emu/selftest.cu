// Kernels that check the emulator itself (tests/test_emu_runtime.py), written as CUDA and
// built through transform.py like csrc/cuda: warp shuffles and ballots, shared memory across
// __syncthreads, 2-D grids and blocks, atomics, and the faults the emulator must report.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// Per thread of one block: the warp's sum by an xor butterfly, the next lane's value
// (shfl_down by 1; the warp's last lane keeps its own), lane 3's value within groups of 8
// (shfl_sync, width 8), and the ballot of v > 0.
__global__ void warp_ops_kernel(const float* in, float* sum, float* down, float* idx,
                                int* ballot) {
  const int t = threadIdx.x;
  const float v = in[t];
  float s = v;
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFull, s, off);
  sum[t] = s;
  down[t] = __shfl_down_sync(kFull, v, 1);
  idx[t] = __shfl_sync(kFull, v, 3, 8);
  ballot[t] = (int)__ballot_sync(kFull, v > 0.f);
}

// Each block reverses its 64 values through shared memory.
__global__ void block_reverse_kernel(const float* in, float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x, base = blockIdx.x * 64;
  buf[t] = in[base + t];
  __syncthreads();
  out[base + t] = buf[63 - t];
}

// Every thread writes its coordinates; a counter counts the threads by atomicAdd.
__global__ void index_kernel(int* out, int* counter) {
  const int bx = blockIdx.x, by = blockIdx.y, tx = threadIdx.x, ty = threadIdx.y;
  const int block = by * gridDim.x + bx, thread = ty * blockDim.x + tx;
  const int i = block * blockDim.x * blockDim.y + thread;
  out[4 * i] = bx;
  out[4 * i + 1] = by;
  out[4 * i + 2] = tx;
  out[4 * i + 3] = ty;
  atomicAdd(counter, 1);
}

// Faults: half a warp at a shuffle while the other half waits at __syncthreads (which = 0),
// a shuffle from a lane that has returned (1), a partial mask (3: raised inside the fiber).
__global__ void fault_kernel(float* out, int which) {
  const int t = threadIdx.x;
  if (which == 0) {
    if (t < 16) out[t] = __shfl_xor_sync(kFull, 1.f, 1);
    __syncthreads();
  } else if (which == 3) {
    out[t] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
  } else {
    if (t >= 16) return;
    out[t] = __shfl_xor_sync(kFull, 1.f, 16);
  }
}

std::vector<at::Tensor> emu_selftest_warp(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) % 32 == 0 && x.scalar_type() == at::kFloat,
              "x: float32, 1-D, a multiple of 32 long");
  auto sum = at::empty_like(x), down = at::empty_like(x), idx = at::empty_like(x);
  auto ballot = at::empty(x.sizes(), x.options().dtype(at::kInt));
  warp_ops_kernel<<<1, (unsigned)x.size(0)>>>(x.data_ptr<float>(), sum.data_ptr<float>(),
                                              down.data_ptr<float>(), idx.data_ptr<float>(),
                                              ballot.data_ptr<int>());
  return {sum, down, idx, ballot};
}

at::Tensor emu_selftest_block(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) % 64 == 0 && x.scalar_type() == at::kFloat,
              "x: float32, 1-D, a multiple of 64 long");
  auto out = at::empty_like(x);
  block_reverse_kernel<<<(unsigned)(x.size(0) / 64), 64>>>(x.data_ptr<float>(),
                                                          out.data_ptr<float>());
  return out;
}

std::vector<at::Tensor> emu_selftest_index(const at::Tensor& like) {
  auto out = at::empty({3 * 2 * 4 * 2, 4}, like.options().dtype(at::kInt));
  auto counter = at::zeros({1}, like.options().dtype(at::kInt));
  index_kernel<<<dim3(3, 2), dim3(4, 2)>>>(out.data_ptr<int>(), counter.data_ptr<int>());
  return {out, counter};
}

at::Tensor emu_selftest_fault(const at::Tensor& like, int64_t which) {
  auto out = at::zeros({32}, like.options().dtype(at::kFloat));
  if (which == 2) {  // an empty grid
    fault_kernel<<<0, 32>>>(out.data_ptr<float>(), 0);
  } else {
    fault_kernel<<<1, 32>>>(out.data_ptr<float>(), (int)which);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  m.def("emu_selftest_warp(Tensor x) -> Tensor[]");
  m.def("emu_selftest_block(Tensor x) -> Tensor");
  m.def("emu_selftest_index(Tensor like) -> Tensor[]");
  m.def("emu_selftest_fault(Tensor like, int which) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("emu_selftest_warp", &emu_selftest_warp);
  m.impl("emu_selftest_block", &emu_selftest_block);
  m.impl("emu_selftest_index", &emu_selftest_index);
  m.impl("emu_selftest_fault", &emu_selftest_fault);
}
