// Kernels that check the emulator itself (tests/test_emu_runtime.py), written as CUDA and
// built through transform.py like csrc/cuda: warp shuffles and ballots, shared memory across
// __syncthreads, 2-D grids and blocks, atomics, the launch orders, and the faults the
// emulator must report (divergence, exited lanes, shared-memory races and bounds, divergent
// barriers).
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

// A tree sum of 64 values in shared memory (each step's reads after the previous step's
// writes, a barrier between), then every thread reads the total: no race.
__global__ void tree_sum_kernel(const float* in, float* out) {
  __shared__ float part[64];
  const int t = threadIdx.x;
  part[t] = in[blockIdx.x * 64 + t];
  __syncthreads();
  for (int stride = 32; stride > 0; stride >>= 1) {
    if (t < stride) part[t] += part[t + stride];
    __syncthreads();
  }
  out[blockIdx.x * 64 + t] = part[0];
}

// Racy on purpose, to show the launch order (EMU_ORDER): thread 0 of each block takes a ticket
// and records its block at that place of `ran` (the order the blocks ran in); every thread of
// every block writes its block's index to last_block[0], and every thread of a block its own
// index to last_thread[block]: what stays there is the last writer's.
__global__ void order_kernel(int* ran, int* tickets, int* last_block, int* last_thread) {
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  const int thread = threadIdx.y * blockDim.x + threadIdx.x;
  if (thread == 0) ran[atomicAdd(tickets, 1)] = block;
  last_block[0] = block;
  last_thread[block] = thread;
}

// What a block finds in shared memory before it writes there, then it writes 1 there.
__global__ void fresh_shared_kernel(float* out) {
  __shared__ float fresh[32];
  const int t = threadIdx.x;
  out[blockIdx.x * 32 + t] = fresh[t];
  fresh[t] = 1.f;
}

// Reads one element past the end of `in` (AddressSanitizer's to report: EMU_ASAN=1).
__global__ void past_the_end_kernel(const float* in, float* out, int n) {
  out[threadIdx.x] = in[n + threadIdx.x];
}

// Faults: half a warp at a shuffle while the other half waits at __syncthreads (which = 0),
// a shuffle from a lane that has returned (1), a partial mask (3: raised inside the fiber),
// a neighbour's shared slot read with no barrier after the writes (4), a shared index past
// the array (5), the two halves of the block at two different barriers (6).
__global__ void fault_kernel(float* out, int which) {
  const int t = threadIdx.x;
  if (which == 0) {
    if (t < 16) out[t] = __shfl_xor_sync(kFull, 1.f, 1);
    __syncthreads();
  } else if (which == 3) {
    out[t] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);
  } else if (which == 4) {
    __shared__ float slot[32];
    slot[t] = (float)t;
    out[t] = slot[(t + 1) % 32];
  } else if (which == 5) {
    __shared__ float half[16];
    half[t] = 1.f;
  } else if (which == 6) {
    if (t < 16) {
      __syncthreads();
    } else {
      __syncthreads();
    }
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

std::vector<at::Tensor> emu_selftest_shared(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) % 64 == 0 && x.scalar_type() == at::kFloat,
              "x: float32, 1-D, a multiple of 64 long");
  auto sums = at::empty_like(x), fresh = at::empty({64}, x.options());
  tree_sum_kernel<<<(unsigned)(x.size(0) / 64), 64>>>(x.data_ptr<float>(), sums.data_ptr<float>());
  fresh_shared_kernel<<<2, 32>>>(fresh.data_ptr<float>());
  return {sums, fresh};
}

at::Tensor emu_selftest_past_end(const at::Tensor& x) {
  auto out = at::zeros({1}, x.options());
  past_the_end_kernel<<<1, 1>>>(x.data_ptr<float>(), out.data_ptr<float>(), (int)x.numel());
  return out;
}

// Allocations the kernels' host code makes and never writes: what a read of them finds.
std::vector<at::Tensor> emu_selftest_empty(const at::Tensor& like) {
  return {at::empty({5}, like.options()), at::empty({3}, like.options().dtype(at::kInt)),
          at::empty_like(like)};
}

std::vector<at::Tensor> emu_selftest_index(const at::Tensor& like) {
  auto out = at::empty({3 * 2 * 4 * 2, 4}, like.options().dtype(at::kInt));
  auto counter = at::zeros({1}, like.options().dtype(at::kInt));
  index_kernel<<<dim3(3, 2), dim3(4, 2)>>>(out.data_ptr<int>(), counter.data_ptr<int>());
  return {out, counter};
}

std::vector<at::Tensor> emu_selftest_order(const at::Tensor& like) {
  const auto opts = like.options().dtype(at::kInt);
  auto ran = at::empty({6}, opts), tickets = at::zeros({1}, opts);
  auto last_block = at::empty({1}, opts), last_thread = at::empty({6}, opts);
  order_kernel<<<dim3(3, 2), dim3(4, 2)>>>(ran.data_ptr<int>(), tickets.data_ptr<int>(),
                                           last_block.data_ptr<int>(),
                                           last_thread.data_ptr<int>());
  return {ran, last_block, last_thread};
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
  m.def("emu_selftest_shared(Tensor x) -> Tensor[]");
  m.def("emu_selftest_empty(Tensor like) -> Tensor[]");
  m.def("emu_selftest_past_end(Tensor x) -> Tensor");
  m.def("emu_selftest_fault(Tensor like, int which) -> Tensor");
  m.def("emu_selftest_order(Tensor like) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("emu_selftest_warp", &emu_selftest_warp);
  m.impl("emu_selftest_block", &emu_selftest_block);
  m.impl("emu_selftest_index", &emu_selftest_index);
  m.impl("emu_selftest_shared", &emu_selftest_shared);
  m.impl("emu_selftest_empty", &emu_selftest_empty);
  m.impl("emu_selftest_past_end", &emu_selftest_past_end);
  m.impl("emu_selftest_fault", &emu_selftest_fault);
  m.impl("emu_selftest_order", &emu_selftest_order);
}
