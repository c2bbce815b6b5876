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
#include <cstdio>
#include <limits>
#include <mutex>
#include <numeric>
#include <random>
#include <unordered_map>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// Under AddressSanitizer (EMU_ASAN=1) every switch between stacks is announced to it, so that
// it knows which stack is live (exceptions thrown in a fiber unpoison the right one), and a
// fiber's stack is unpoisoned before the fiber starts again (its last frames never returned).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_SWITCH_FROM(fake, bottom, size) __sanitizer_start_switch_fiber(fake, bottom, size)
#define EMU_SWITCHED_TO(fake, bottom, size) __sanitizer_finish_switch_fiber(fake, bottom, size)
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_SWITCH_FROM(fake, bottom, size) ((void)0)
#define EMU_SWITCHED_TO(fake, bottom, size) ((void)0)
#define EMU_UNPOISON(p, n) ((void)0)
#endif

emu::dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t kStack = 256 * 1024;

// An element of a shared array that a fiber touched in its current run (between two of its
// sync points), and the element's bytes when it first did.
struct Access {
  const unsigned char* at;
  size_t size, snap;  // snap: offset of the bytes in Machine::snapshot
};

// Who touched an element of shared memory since the block's last barrier.
struct Touch {
  int writer = -1, reader = -1, reader2 = -1;  // the last writer, two of the readers
};

struct SharedArray {
  unsigned char* base;
  size_t bytes, elem;
  bool poison;
  const char* name;
};

struct Machine {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack = nullptr;  // its bottom and size, for AddressSanitizer
  size_t scheduler_stack_size = 0;
  int current = 0;
  const char* kernel = "";
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::exception_ptr error;  // thrown inside a fiber, rethrown by the scheduler
  std::vector<SharedArray> shared;  // every shared array accessed so far
  std::vector<Access> accesses;     // of the running fiber, since it was resumed
  std::vector<unsigned char> snapshot;
  std::unordered_map<const void*, Touch> touched;  // since the block's last barrier
  std::vector<int> perm;             // the block's fibers in this round's order
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

// EMU_POISON=0 leaves fresh memory as the allocator gives it (to tell a read of unwritten
// memory from another fault).
bool poisoning() {
  static const bool on = !std::getenv("EMU_POISON") || std::strcmp(std::getenv("EMU_POISON"), "0");
  return on;
}

// The order a launch runs its blocks in, and each block its runnable fibers between sync
// points (EMU_ORDER): "forward" (the default: index order), "reverse" (EMU_REVERSE=1 too), or
// "shuffle:SEED" (a pseudo-random permutation of the blocks per launch and of the fibers per
// round, drawn from SEED, the kernel's name and the grid: the same call, the same order).
// A GPU runs blocks in whatever order its SMs take them, so a kernel whose outputs change
// with the order has a race in global memory that the shared-memory checks cannot see: two
// blocks (or threads) write one address, or one reads what another writes, with no barrier
// between (tests/test_cuda_launch_order.py).
struct Order {
  enum Kind { kForward, kReverse, kShuffle } kind = kForward;
  uint64_t seed = 0;
};

Order launch_order(const char* kernel) {
  Order o;
  const char* v = std::getenv("EMU_ORDER");
  if (!v || !*v) {
    if (std::getenv("EMU_REVERSE")) o.kind = Order::kReverse;
    return o;
  }
  if (!std::strcmp(v, "forward")) return o;
  if (!std::strcmp(v, "reverse")) {
    o.kind = Order::kReverse;
    return o;
  }
  char* end = nullptr;
  if (!std::strncmp(v, "shuffle:", 8) && v[8]) {
    o.seed = std::strtoull(v + 8, &end, 10);
    if (end && !*end) {
      o.kind = Order::kShuffle;
      return o;
    }
  }
  TORCH_CHECK(false, "cuda_emu: kernel ", kernel, ": EMU_ORDER=", v,
              " (expected forward, reverse or shuffle:SEED with SEED a non-negative integer)");
  return o;
}

// The shuffled order's generator: FNV-1a over the seed, the kernel's name and the grid.
uint64_t order_seed(const Order& o, const char* kernel, const dim3& grid) {
  uint64_t h = 0xcbf29ce484222325ull;
  const auto mix = [&h](uint64_t v) {
    for (int b = 0; b < 8; ++b, v >>= 8) h = (h ^ (v & 0xff)) * 0x100000001b3ull;
  };
  mix(o.seed);
  for (const char* c = kernel; *c; ++c) mix((unsigned char)*c);
  mix(grid.x), mix(grid.y), mix(grid.z);
  return h;
}

// EMU_LAUNCH_LOG=FILE appends each launch to FILE, a line each: the kernel's name, the grid's
// and the block's sizes (the tests check which kernels a call ran, and on how many blocks).
void log_launch(const char* kernel, const Cfg& cfg) {
  const char* path = std::getenv("EMU_LAUNCH_LOG");
  if (!path || !*path) return;
  std::FILE* f = std::fopen(path, "a");
  TORCH_CHECK(f, "cuda_emu: EMU_LAUNCH_LOG=", path, " cannot be opened for appending");
  std::fprintf(f, "%s %u %u %u %u %u %u\n", kernel, cfg.grid.x, cfg.grid.y, cfg.grid.z,
               cfg.block.x, cfg.block.y, cfg.block.z);
  std::fclose(f);
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
  EMU_SWITCHED_TO(nullptr, &m.scheduler_stack, &m.scheduler_stack_size);
  try {
    m.body(m.body_arg);
  } catch (...) {  // an exception must not unwind past the fiber's first frame
    m.error = std::current_exception();
  }
  Fiber& f = m.fibers[m.current];
  f.wait = Wait::kDone;
  EMU_SWITCH_FROM(nullptr, m.scheduler_stack, m.scheduler_stack_size);  // for good
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
  EMU_UNPOISON(m.stacks[t].get(), kStack);
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
  void* fake = nullptr;
  EMU_SWITCH_FROM(&fake, m.stacks[t].get(), kStack);
#if defined(__x86_64__)
  emu_switch(&m.scheduler_sp, m.fibers[t].sp);
#else
  swapcontext(&m.scheduler, &m.ctx[t]);
#endif
  EMU_SWITCHED_TO(fake, nullptr, nullptr);
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

const SharedArray* array_of(const Machine& m, const void* p) {
  for (const SharedArray& a : m.shared)
    if (p >= a.base && p < a.base + a.bytes) return &a;
  return nullptr;
}

[[noreturn]] void race(const Machine& m, const void* p, const char* what, int a, int b) {
  const SharedArray* arr = array_of(m, p);
  const size_t index = arr ? (size_t)((const unsigned char*)p - arr->base) / arr->elem : 0;
  fail(std::string("shared memory race on ") + (arr ? arr->name : "?") + "[" +
       std::to_string(index) + "] (flat index): " + what + " by threads " + std::to_string(a) +
       " and " + std::to_string(b) + " with no __syncthreads between them");
}

// After fiber t's run: each shared element it touched was written if its bytes changed, else
// read; two threads on one element since the last barrier, one of them writing, is a race.
// (A write of the value already there counts as a read: a race the check can miss, never one
// it reports falsely.)
void close_run(Machine& m, int t) {
  for (const Access& a : m.accesses) {
    const bool wrote = std::memcmp(a.at, m.snapshot.data() + a.snap, a.size) != 0;
    Touch& e = m.touched[a.at];
    if (e.writer >= 0 && e.writer != t)
      race(m, a.at, wrote ? "written" : "written and read", e.writer, t);
    if (wrote) {
      const int other = e.reader >= 0 && e.reader != t ? e.reader : e.reader2;
      if (other >= 0) race(m, a.at, "read and written", other, t);
      e.writer = t;
    } else if (e.reader < 0) {
      e.reader = t;
    } else if (e.reader != t && e.reader2 < 0) {
      e.reader2 = t;
    }
  }
  m.accesses.clear();
  m.snapshot.clear();
}

// Runs one block: fibers until every one is done, releasing warps and the block as they wait.
void run_block(Machine& m, unsigned threads, const Order& order, std::mt19937_64& rng,
               uint64_t control) {
  for (unsigned t = 0; t < threads; ++t) start_fiber(m, (int)t, control);
  for (const SharedArray& a : m.shared)
    if (a.poison && poisoning()) std::memset(a.base, 0xff, a.bytes);
  m.touched.clear();
  const int warps = (int)((threads + 31) / 32);
  m.perm.resize(threads);
  std::iota(m.perm.begin(), m.perm.end(), 0);
  if (order.kind == Order::kReverse) std::reverse(m.perm.begin(), m.perm.end());
  for (;;) {
    unsigned waiting = 0;
    if (order.kind == Order::kShuffle) std::shuffle(m.perm.begin(), m.perm.end(), rng);
    for (unsigned k = 0; k < threads; ++k) {
      const int t = m.perm[k];
      if (m.fibers[t].wait != Wait::kRun) {
        waiting += m.fibers[t].wait != Wait::kDone;
        continue;
      }
      m.current = t;
      set_thread(t);
      m.accesses.clear();
      m.snapshot.clear();
      resume(m, t);
      if (m.error) std::rethrow_exception(std::exchange(m.error, nullptr));
      close_run(m, t);
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
    int first = -1;
    for (unsigned t = 0; t < threads; ++t) {
      if (m.fibers[t].wait != Wait::kBlock) continue;
      if (first < 0) first = (int)t;
      if (std::strcmp(m.fibers[t].site, m.fibers[first].site) != 0)
        fail("threads wait at two different __syncthreads: thread " + std::to_string(first) +
             " at " + m.fibers[first].site + ", thread " + std::to_string(t) + " at " +
             m.fibers[t].site + " (a divergent barrier)");
      m.fibers[t].wait = Wait::kRun;
    }
    m.touched.clear();  // a barrier: what was written before it may be read after it
  }
}

}  // namespace

Fiber& current_fiber() {
  Machine& m = machine();
  return m.fibers[m.current];
}

void yield_to_scheduler() {
  Machine& m = machine();
  Fiber& f = m.fibers[m.current];
  EMU_SWITCH_FROM(&f.fake_stack, m.scheduler_stack, m.scheduler_stack_size);
#if defined(__x86_64__)
  emu_switch(&f.sp, m.scheduler_sp);
#else
  swapcontext(&m.ctx[m.current], &m.scheduler);
#endif
  EMU_SWITCHED_TO(f.fake_stack, &m.scheduler_stack, &m.scheduler_stack_size);
}

void syncthreads(const char* site) {
  Fiber& f = current_fiber();
  f.wait = Wait::kBlock;
  f.site = site;
  yield_to_scheduler();
}

void shared_register(void* base, size_t bytes, size_t elem, bool poison, const char* name) {
  Machine& m = machine();
  m.shared.push_back({static_cast<unsigned char*>(base), bytes, elem, poison, name});
  // first seen inside a block: start it as poisoned as the next blocks will find it
  if (poison && poisoning()) std::memset(base, 0xff, bytes);
}

void shared_access(const void* elem, size_t size) {
  Machine& m = machine();
  auto* p = static_cast<const unsigned char*>(elem);
  for (const Access& a : m.accesses)
    if (a.at == p) return;
  m.accesses.push_back({p, size, m.snapshot.size()});
  m.snapshot.insert(m.snapshot.end(), p, p + size);
}

void shared_out_of_bounds(const char* name, long long i, size_t n) {
  fail(std::string("shared memory out of bounds: ") + name + "[" + std::to_string(i) +
       "] of a dimension of " + std::to_string(n) + " (thread " +
       std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + "," +
       std::to_string(threadIdx.z) + ")");
}

void poison(at::Tensor& t) {
  if (!t.numel() || !poisoning()) return;
  if (t.is_floating_point() || t.is_complex()) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else if (t.scalar_type() == at::kBool) {
    t.fill_(true);
  } else {
    std::memset(t.data_ptr(), 0x5a, t.numel() * t.element_size());  // contiguous from empty
  }
}

void fail(const std::string& what) {
  TORCH_CHECK(false, "cuda_emu: kernel ", machine().kernel, " (grid ", gridDim.x, "x",
              gridDim.y, "x", gridDim.z, ", block ", blockDim.x, "x", blockDim.y, "x",
              blockDim.z, ", at block ", blockIdx.x, ",", blockIdx.y, ",", blockIdx.z,
              "): ", what);
}

#if defined(__SANITIZE_ADDRESS__)
// ASan's report names the functions (a kernel inlined into its launch's lambda); this names
// the launch and the thread, as compute-sanitizer's report does.
void asan_report(const char*) {
  Machine& m = machine();
  std::fprintf(stderr,
               "cuda_emu: in kernel %s (grid %ux%ux%u, block %ux%ux%u), block %u,%u,%u, "
               "thread %u,%u,%u\n",
               m.kernel, gridDim.x, gridDim.y, gridDim.z, blockDim.x, blockDim.y, blockDim.z,
               blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
}
#endif

void run_grid(const Cfg& cfg, const char* name, void (*body)(void*), void* arg) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  Machine& m = machine();
#if defined(__SANITIZE_ADDRESS__)
  static const bool reporter = (__asan_set_error_report_callback(&asan_report), true);
  (void)reporter;
#endif
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
  const Order order = launch_order(name);
  log_launch(name, cfg);
  std::mt19937_64 rng(order_seed(order, name, cfg.grid));
#if defined(__x86_64__)
  const uint64_t control = control_words();
#else
  const uint64_t control = 0;
#endif
  const uint64_t gx = cfg.grid.x, gxy = gx * cfg.grid.y, blocks = gxy * cfg.grid.z;
  std::vector<uint64_t> ids;  // the blocks' linear indices in the order they run
  if (order.kind != Order::kForward) {
    ids.resize(blocks);
    std::iota(ids.begin(), ids.end(), uint64_t{0});
    if (order.kind == Order::kReverse) std::reverse(ids.begin(), ids.end());
    else std::shuffle(ids.begin(), ids.end(), rng);
  }
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t i = ids.empty() ? k : ids[k];
    blockIdx = dim3((unsigned)(i % gx), (unsigned)(i % gxy / gx), (unsigned)(i / gxy));
    run_block(m, threads, order, rng, control);
  }
}

}  // namespace emu
