// The emulator's scheduler (runtime.h): each CUDA thread of a block is a fiber with its own
// stack on the calling OS thread; a fiber runs until it reaches a sync point (__syncthreads,
// a warp operation) or returns, and the scheduler releases a warp when all of its live lanes
// wait at a warp operation, the block when all of its live threads wait at __syncthreads.
//
// The switch between fibers is a few instructions (x86-64: the callee-saved registers, MXCSR
// and the x87 control word, then the stack pointer), about 20× cheaper than swapcontext,
// whose signal-mask system call made the emulated tests spend most of their time in the
// kernel. Elsewhere ucontext does the same job.
#include "runtime.h"

#include <algorithm>
#include <mutex>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

emu::dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t kStack = 256 * 1024;

struct Machine {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  void* scheduler_sp = nullptr;
  int current = 0;
  const char* kernel = "";
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::exception_ptr error;  // thrown inside a fiber, rethrown by the scheduler
#if !defined(__x86_64__)
  std::vector<ucontext_t> ctx;
  ucontext_t scheduler;
#endif
};

Machine& machine() {
  static Machine m;
  return m;
}

std::mutex& launch_mutex() {
  static std::mutex mu;
  return mu;
}

}  // namespace
}  // namespace emu

#if defined(__x86_64__)
// emu_switch(save, load): saves the caller's callee-saved state on its stack and its stack
// pointer in *save, then continues on the stack load (a fiber's saved frame, or a new
// fiber's initial frame built by start_frame), returning there.
extern "C" void emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl emu_switch
  .hidden emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
#endif

namespace emu {
namespace {

void fiber_main() {
  Machine& m = machine();
  try {
    m.body(m.body_arg);
  } catch (...) {  // an exception must not unwind past the fiber's first frame
    m.error = std::current_exception();
  }
  Fiber& f = m.fibers[m.current];
  f.wait = Wait::kDone;
#if defined(__x86_64__)
  emu_switch(&f.sp, m.scheduler_sp);  // never resumed
  __builtin_unreachable();
#endif  // ucontext: uc_link returns to the scheduler
}

#if defined(__x86_64__)
// A new fiber's stack, as emu_switch expects to find it: control words, six callee-saved
// registers, the address fiber_main starts at, and a null return address above it so that
// fiber_main is entered with the stack alignment of a call.
uint64_t control_words() {
  uint32_t csr;
  uint16_t cw;
  asm volatile("stmxcsr %0" : "=m"(csr));
  asm volatile("fnstcw %0" : "=m"(cw));
  return uint64_t(csr) | (uint64_t(cw) << 32);
}

void* start_frame(char* stack, uint64_t control) {
  auto top = reinterpret_cast<uintptr_t>(stack + kStack) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                          // fiber_main's return address
  *--slot = reinterpret_cast<uint64_t>(&fiber_main);    // emu_switch's ret
  for (int r = 0; r < 6; ++r) *--slot = 0;              // rbp rbx r12 r13 r14 r15
  *--slot = control;                                    // MXCSR, x87 control word
  return slot;
}
#endif

void start_fiber(Machine& m, int t, uint64_t control) {
  Fiber& f = m.fibers[t];
  f.wait = Wait::kRun;
#if defined(__x86_64__)
  f.sp = start_frame(m.stacks[t].get(), control);
#else
  (void)control;
  ucontext_t& c = m.ctx[t];
  getcontext(&c);
  c.uc_stack.ss_sp = m.stacks[t].get();
  c.uc_stack.ss_size = kStack;
  c.uc_link = &m.scheduler;
  makecontext(&c, fiber_main, 0);
#endif
}

void resume(Machine& m, int t) {
#if defined(__x86_64__)
  emu_switch(&m.scheduler_sp, m.fibers[t].sp);
#else
  swapcontext(&m.scheduler, &m.ctx[t]);
#endif
}

void set_thread(int t) {
  const dim3 b = blockDim;
  threadIdx = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
}

// Resolves one warp whose live lanes all wait at the same warp operation.
void resolve_warp(std::vector<Fiber>& f, int first, int lanes) {
  WarpOp op = WarpOp::kXor;
  for (int l = 0; l < lanes; ++l)
    if (f[first + l].wait == Wait::kWarp) op = f[first + l].op;
  unsigned ballot = 0;
  for (int l = 0; l < lanes; ++l) {
    Fiber& x = f[first + l];
    if (x.wait != Wait::kWarp) continue;
    if (x.op != op) fail("lanes of one warp wait at different warp operations");
    if (op == WarpOp::kBallot && x.value[0]) ballot |= 1u << l;
  }
  for (int l = 0; l < lanes; ++l) {
    Fiber& x = f[first + l];
    if (x.wait != Wait::kWarp) continue;
    if (op == WarpOp::kBallot) {
      const unsigned r = ballot & x.mask;
      std::memcpy(x.result, &r, sizeof r);
    } else {
      const int w = x.width, base = l - l % w;
      int src = l;
      if (op == WarpOp::kXor) src = base + ((l % w) ^ x.arg) % w;
      if (op == WarpOp::kDown) src = (l % w) + x.arg < w ? l + x.arg : l;
      if (op == WarpOp::kIdx) src = base + ((x.arg % w) + w) % w;
      if (src < 0 || src >= lanes || f[first + src].wait != Wait::kWarp)
        fail("lane " + std::to_string(l) + " of warp " + std::to_string(first / 32) +
             " shuffles from lane " + std::to_string(src) +
             ", which has exited or is past the block's last thread");
      std::memcpy(x.result, f[first + src].value, sizeof x.result);
    }
  }
  for (int l = 0; l < lanes; ++l)
    if (f[first + l].wait == Wait::kWarp) f[first + l].wait = Wait::kRun;
}

// Runs one block: fibers until every one is done, releasing warps and the block as they wait.
void run_block(Machine& m, unsigned threads, bool reverse, uint64_t control) {
  for (unsigned t = 0; t < threads; ++t) start_fiber(m, (int)t, control);
  const int warps = (int)((threads + 31) / 32);
  for (;;) {
    unsigned waiting = 0;
    for (unsigned k = 0; k < threads; ++k) {
      const int t = reverse ? (int)(threads - 1 - k) : (int)k;
      if (m.fibers[t].wait != Wait::kRun) {
        waiting += m.fibers[t].wait != Wait::kDone;
        continue;
      }
      m.current = t;
      set_thread(t);
      resume(m, t);
      if (m.error) std::rethrow_exception(std::exchange(m.error, nullptr));
      waiting += m.fibers[t].wait != Wait::kDone;
    }
    if (waiting == 0) return;  // every thread returned (most kernels: no sync point at all)
    // Every fiber now waits or is done: release whole warps first, then the block.
    bool any_warp = false, any_block = false;
    for (int w = 0; w < warps; ++w) {
      const int first = 32 * w, lanes = std::min<int>(32, (int)threads - first);
      int at_warp = 0, at_block = 0;
      for (int l = 0; l < lanes; ++l) {
        at_warp += m.fibers[first + l].wait == Wait::kWarp;
        at_block += m.fibers[first + l].wait == Wait::kBlock;
      }
      if (at_warp && at_block)
        fail("some lanes of warp " + std::to_string(w) + " wait at a warp operation, others "
             "at __syncthreads (a divergent warp operation)");
      if (at_warp) {
        resolve_warp(m.fibers, first, lanes);
        any_warp = true;
      }
      any_block |= at_block > 0;
    }
    if (any_warp) continue;
    if (!any_block) return;  // all done
    for (unsigned t = 0; t < threads; ++t)
      if (m.fibers[t].wait == Wait::kBlock) m.fibers[t].wait = Wait::kRun;
  }
}

}  // namespace

Fiber& current_fiber() {
  Machine& m = machine();
  return m.fibers[m.current];
}

void yield_to_scheduler() {
  Machine& m = machine();
#if defined(__x86_64__)
  emu_switch(&m.fibers[m.current].sp, m.scheduler_sp);
#else
  swapcontext(&m.ctx[m.current], &m.scheduler);
#endif
}

void fail(const std::string& what) {
  TORCH_CHECK(false, "cuda_emu: kernel ", machine().kernel, " (grid ", gridDim.x, "x",
              gridDim.y, "x", gridDim.z, ", block ", blockDim.x, "x", blockDim.y, "x",
              blockDim.z, ", at block ", blockIdx.x, ",", blockIdx.y, ",", blockIdx.z,
              "): ", what);
}

void run_grid(const Cfg& cfg, const char* name, void (*body)(void*), void* arg) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  Machine& m = machine();
  const unsigned threads = cfg.block.x * cfg.block.y * cfg.block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024, "cuda_emu: kernel ", name, ": block of ",
              threads, " threads (1 to 1024 allowed)");
  TORCH_CHECK(cfg.grid.x >= 1 && cfg.grid.y >= 1 && cfg.grid.z >= 1, "cuda_emu: kernel ", name,
              ": empty grid ", cfg.grid.x, "x", cfg.grid.y, "x", cfg.grid.z,
              " (a GPU rejects the launch: invalid configuration argument)");
  TORCH_CHECK(cfg.grid.y <= 65535 && cfg.grid.z <= 65535, "cuda_emu: kernel ", name,
              ": grid.y/z above 65535");
  m.kernel = name;
  m.body = body;
  m.body_arg = arg;
  gridDim = cfg.grid;
  blockDim = cfg.block;
  if (m.fibers.size() < threads) m.fibers.resize(threads);
  while (m.stacks.size() < threads) m.stacks.emplace_back(new char[kStack]);
#if !defined(__x86_64__)
  if (m.ctx.size() < threads) m.ctx.resize(threads);
#endif
  const bool reverse = std::getenv("EMU_REVERSE") != nullptr;
#if defined(__x86_64__)
  const uint64_t control = control_words();
#else
  const uint64_t control = 0;
#endif
  for (unsigned bz = 0; bz < cfg.grid.z; ++bz)
    for (unsigned by = 0; by < cfg.grid.y; ++by)
      for (unsigned bx = 0; bx < cfg.grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        run_block(m, threads, reverse, control);
      }
}

}  // namespace emu
