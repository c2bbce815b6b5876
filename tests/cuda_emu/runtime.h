// A CPU emulator of the CUDA execution model, just wide enough for csrc/cuda: the .cu sources,
// rewritten by tests/cuda_emu/transform.py (launches, includes, registrations), compile as
// plain C++ against this header and run their kernels on CPU tensors, so that the CPU-only CI
// runs the CUDA engine's own indexing, launch geometry, shared memory and warp reductions
// against the CPU ops. It is a test tool, not an engine: one block at a time, each CUDA thread
// a fiber on the calling OS thread (runtime.cpp), switched only at the sync points below.
//
// What it checks beyond the values, each a c10::Error naming the kernel launch:
// - a warp operation that not all live lanes of the warp reach (divergence under a full mask),
//   a lane reading from an exited lane, a __syncthreads that some warp's live lanes never
//   reach while others wait at a warp operation (a deadlock on a GPU);
// - threads of a block waiting at two different __syncthreads (call sites);
// - shared memory (compute-sanitizer's racecheck and memcheck, for __shared__ arrays): an
//   index out of the array's bounds, and two threads touching one element between two
//   barriers where one of them writes it (the element's bytes changed over the thread's run);
// - reads of memory never written (initcheck): at::empty/empty_like in the kernels' host code
//   give NaN (floating point) or 0x5a bytes (integers), and shared arrays start each block as
//   0xff bytes, where a GPU's recycled memory would hold whatever was there before.
// Global memory out of bounds is AddressSanitizer's (EMU_ASAN=1, scripts/emu_memcheck.sh).
// - races in global memory, indirectly: EMU_ORDER=reverse or shuffle:SEED runs a launch's
//   blocks, and each block's fibers between sync points, in another order (runtime.cpp); a
//   kernel whose outputs change with it reads or writes an address that another block or
//   thread writes with no barrier between (tests/test_cuda_launch_order.py).
// What it cannot see: a race that no order it tries brings out (it has no log of global
// accesses), threads that a GPU would interleave within a run between sync points, timing
// and memory coalescing.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

// --- the CUDA language's host/device qualifiers: plain C++ here --------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory: one block runs at a time, so a function-local static is the block's own
// (transform.py makes each __shared__ array an emu::Shared, which checks its accesses).
#define __shared__ static

using cudaStream_t = void*;

namespace emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The launch configuration, as written between <<< and >>>.
struct Cfg {
  dim3 grid, block;
  Cfg(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}
};

enum class Wait { kRun, kBlock, kWarp, kDone };
enum class WarpOp { kXor, kDown, kIdx, kBallot };

// One emulated thread: its stack pointer while switched out, what it waits at, and the value
// it posted to a warp operation (and the result handed back).
struct Fiber {
  void* sp = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
  Wait wait = Wait::kRun;
  WarpOp op = WarpOp::kXor;
  int arg = 0, width = 32;
  unsigned mask = 0;
  const char* site = "";  // the __syncthreads it waits at: "file:line"
  alignas(16) unsigned char value[16], result[16];
};

// Defined in runtime.cpp (one copy per emulator library).
Fiber& current_fiber();
void yield_to_scheduler();  // from a fiber: back to the scheduler until released
void run_grid(const Cfg& cfg, const char* name, void (*body)(void*), void* arg);
[[noreturn]] void fail(const std::string& what);
// Shared memory: an array registers itself on its first access (so that each block starts it
// as 0xff bytes), and every element access is recorded for the race check at the next sync.
void shared_register(void* base, size_t bytes, size_t elem, bool poison, const char* name);
void shared_access(const void* elem, size_t size);
[[noreturn]] void shared_out_of_bounds(const char* name, long long i, size_t n);
// at::empty's memory as a GPU's caching allocator may hand it out: not zero, not the values
// a kernel expects; NaN in floating point, so that a read before a write shows in the results.
void poison(at::Tensor& t);

}  // namespace emu

// The built-in variables: set by the scheduler before it resumes a fiber.
extern emu::dim3 threadIdx, blockIdx, blockDim, gridDim;
using dim3 = emu::dim3;

namespace emu {

template <typename F>
struct Body {
  static void call(void* f) { (*static_cast<F*>(f))(); }
};

// kernel<<<cfg>>>(args...) becomes emu::launch(emu::Cfg(cfg), "kernel", [&] { kernel(args); })
template <typename F>
void launch(const Cfg& cfg, const char* name, F run) {
  run_grid(cfg, name, &Body<F>::call, &run);
}

// The calling lane posts v and waits until every live lane of its warp has posted; the
// scheduler then hands each lane its result (R: V for shuffles, the mask for a ballot).
template <typename R, typename V>
R warp_op(WarpOp op, unsigned mask, V v, int arg, int width) {
  static_assert(sizeof(V) <= 16 && std::is_trivially_copyable<V>::value,
                "cuda_emu: warp operations on small trivially copyable values only");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width must be 2^k <= 32");
  Fiber& f = current_fiber();
  if (mask != 0xffffffffu) fail("a warp operation with a partial mask (not emulated)");
  std::memcpy(f.value, &v, sizeof v);
  f.op = op;
  f.arg = arg;
  f.width = width;
  f.mask = mask;
  f.wait = Wait::kWarp;
  yield_to_scheduler();
  R r;
  std::memcpy(&r, f.result, sizeof r);
  return r;
}

template <size_t... D>
struct Prod {
  static constexpr size_t value = 1;
};
template <size_t N, size_t... D>
struct Prod<N, D...> {
  static constexpr size_t value = N * Prod<D...>::value;
};

// A view of the elements [base, base + N·Rest...) of a shared array: [i] checks i < N and
// gives the element (last dimension, recorded) or the sub-array.
template <typename T, size_t N, size_t... Rest>
struct SharedSub {
  T* base;
  const char* name;
  decltype(auto) operator[](long long i) const {
    if (i < 0 || (size_t)i >= N) shared_out_of_bounds(name, i, N);
    if constexpr (sizeof...(Rest) == 0) {
      shared_access(base + i, sizeof(T));
      return base[i];
    } else {
      return SharedSub<T, Rest...>{base + i * Prod<Rest...>::value, name};
    }
  }
};

// __shared__ T name[D0][D1]... becomes __shared__ emu::Shared<T, D0, D1...> name{"name"}.
template <typename T, size_t... D>
struct Shared {
  static constexpr size_t kSize = Prod<D...>::value;
  const char* name;
  bool registered = false;
  T data[kSize];
  explicit Shared(const char* n) : name(n) {}
  decltype(auto) operator[](long long i) {
    if (!registered) {
      shared_register(data, sizeof data, sizeof(T), std::is_trivially_copyable<T>::value, name);
      registered = true;
    }
    return SharedSub<T, D...>{data, name}[i];
  }
};

inline at::Tensor empty(at::IntArrayRef size, at::TensorOptions opt = {},
                        std::optional<at::MemoryFormat> format = std::nullopt) {
  at::Tensor t = at::empty(size, opt, format);
  poison(t);
  return t;
}
inline at::Tensor empty_like(const at::Tensor& like, at::TensorOptions opt = {},
                             std::optional<at::MemoryFormat> format = std::nullopt) {
  at::Tensor t = at::empty_like(like, opt, format);
  poison(t);
  return t;
}

void syncthreads(const char* site);

}  // namespace emu

#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
// The call site names the barrier: threads of one block at two sites is a fault.
#define __syncthreads() ::emu::syncthreads(__FILE__ ":" EMU_STR(__LINE__))

template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  return emu::warp_op<V>(emu::WarpOp::kXor, mask, v, lane_mask, width);
}
template <typename V>
V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  return emu::warp_op<V>(emu::WarpOp::kDown, mask, v, (int)delta, width);
}
template <typename V>
V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
  return emu::warp_op<V>(emu::WarpOp::kIdx, mask, v, src_lane, width);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return emu::warp_op<unsigned>(emu::WarpOp::kBallot, mask, (unsigned char)(predicate != 0), 0,
                                32);
}
// The CUDA math library's global names.
using std::isfinite;
using std::isinf;
using std::isnan;
// Round-to-nearest operations that a GPU compiler may not contract into an FMA; the emulator
// builds with -ffp-contract=off, so plain operations are the same.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
// Fibers of one OS thread never interleave inside an atomic: plain read-modify-write.
template <typename V>
V atomicAdd(V* p, V v) {
  const V old = *p;
  *p = old + v;
  return old;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }

// --- the host side's CUDA pieces that csrc/cuda uses ---------------------------------------
// (transform.py replaces the includes of ATen/cuda and c10/cuda headers by this file)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10

struct cudaDeviceProp {
  int multiProcessorCount;
  int warpSize;
  int maxThreadsPerBlock;
};

namespace at {
namespace cuda {
// A small device: EMU_SMS streaming multiprocessors (default 2), so that launch geometry
// that scales with the SM count (warp-per-row folds from 32 × SMs rows) is reached by small
// test shapes.
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp p{std::getenv("EMU_SMS") ? std::atoi(std::getenv("EMU_SMS")) : 2, 32,
                          1024};
  return &p;
}
}  // namespace cuda
}  // namespace at
