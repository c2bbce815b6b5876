// The CUDA engine of the fused pair losses whose loss is a function of per-anchor row
// statistics (multi-similarity, contrastive, ...): S = x rᵀ streamed in chunks of r, each
// chunk's product through cuBLAS (at::mm: tensor cores, TF32 where PyTorch allows it), then
//   forward:  one warp (or block) per row folds the chunk's pairs into the row's state (a loss-given
//             struct: log-sum-exps, sums, counts) held in device memory between chunks;
//   backward: the chunk is recomputed and overwritten in place by G = ∂L/∂S, one thread per
//             entry, then dx += G r_c and dr_c = Gᵀ x (cuBLAS again).
// The per-pair math is the loss's shared host/device header (common/*.h), the same code the
// CPU ops run and the CPU tests check. Peak extra memory: one B×chunk tile.
//
// A Loss provides:
//   struct State { static MO_HD State empty(); MO_HD void merge(const State&); }  (POD)
//   __device__ void fold(State&, T s, bool positive, int64_t row) const
//   __device__ T grad(T s, bool positive, int64_t row) const
// (or fold_at / grad_at, which take the reference index too: below).
// Why recompute rather than keep G from the forward: keeping it is the B×M matrix this
// engine exists to avoid; the recomputation is one chunk product per chunk (4 products in
// all against the floor's 3).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/row_state.h"  // MO_HD

namespace metrix_ops {
namespace cuda_pairs {

// The state of a loss that keeps one online log-sum-exp per side of a row (positives,
// negatives): MS, Circle, GeneralizedLifted, and ProxyAnchor's per-proxy terms.
template <typename T>
struct TwoSideLse {
  OnlineLse<T> pos, neg;
  MO_HD static TwoSideLse empty() { return {OnlineLse<T>::empty(), OnlineLse<T>::empty()}; }
  MO_HD void merge(const TwoSideLse& o) {
    pos.merge(o.pos);
    neg.merge(o.neg);
  }
};

// The state of a loss that keeps per row the sum and count of its kept terms on each side
// (contrastive, clean and mixed): fp64 sums, as the CPU ops (B·M terms would lose digits in
// fp32).
struct SideSums {
  double pos_sum, neg_sum;
  long long pos_cnt, neg_cnt;
  MO_HD static SideSums empty() { return {0.0, 0.0, 0, 0}; }
  MO_HD void merge(const SideSums& o) {
    pos_sum += o.pos_sum;
    neg_sum += o.neg_sum;
    pos_cnt += o.pos_cnt;
    neg_cnt += o.neg_cnt;
  }
};

// The pair ops' input checks (common/checks.h), and that x lives on a CUDA device.
inline void check_cuda_pair_call(const at::Tensor& x, const at::Tensor& r,
                                 const at::Tensor& labels, const at::Tensor& ref_labels,
                                 int64_t chunk) {
  check_pair_op_inputs(x, r, labels, ref_labels, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

// The self ops' block (rows and columns of a tile of S).
inline void check_block(int64_t block) {
  TORCH_CHECK(block > 0, "block must be > 0, got ", block);
}

constexpr int kThreads = 256;

// 1: positive pair, 0: negative pair, -1: the excluded self pair (yi: row i's label)
__device__ __forceinline__ int pair_kind(int64_t yi, const int64_t* __restrict__ yc, int64_t i,
                                         int64_t gj, bool exclude_diag) {
  if (exclude_diag && gj == i) return -1;
  return yc[gj] == yi ? 1 : 0;
}

// A POD state moved down the warp by `off` lanes, 32-bit word by word.
template <class State>
__device__ __forceinline__ State shfl_down_state(const State& v, int off) {
  static_assert(std::is_trivially_copyable<State>::value, "State must be POD");
  static_assert(sizeof(State) % sizeof(int) == 0, "State must be whole 32-bit words");
  constexpr int kWords = sizeof(State) / sizeof(int);
  int w[kWords];
  memcpy(w, &v, sizeof(State));
#pragma unroll
  for (int k = 0; k < kWords; ++k) w[k] = __shfl_down_sync(0xffffffffu, w[k], off);
  State out;
  memcpy(&out, w, sizeof(State));
  return out;
}

// kRowWarps warps per row (1, or kThreads / 32 for one block per row), lanes taking strided
// columns (a warp reads consecutive entries: coalesced). The states merge by a fixed tree:
// A Loss may instead take the entry's reference index too, fold_at(State&, s, positive, row,
// ref) and grad_at(s, positive, row, ref) (ProxyAnchor's per-example weights); the others
// see the row only.
template <class L, class = void>
struct TakesRef : std::false_type {};
template <class L>
struct TakesRef<L, std::void_t<decltype(&L::fold_at)>> : std::true_type {};

template <class Loss, class State, typename T>
__device__ __forceinline__ void fold_entry(const Loss& loss, State& st, T s, bool pos,
                                           int64_t row, int64_t ref) {
  if constexpr (TakesRef<Loss>::value) loss.fold_at(st, s, pos, row, ref);
  else loss.fold(st, s, pos, row);
}

template <class Loss, typename T>
__device__ __forceinline__ T grad_entry(const Loss& loss, T s, bool pos, int64_t row,
                                        int64_t ref) {
  if constexpr (TakesRef<Loss>::value) return loss.grad_at(s, pos, row, ref);
  else return loss.grad(s, pos, row);
}

// lane l takes lane l + 16, + 8, ..., + 1 (shuffles), then the row's warps in order, so the
// result does not depend on scheduling. One warp per row when there are rows enough to fill
// the GPU: no shared memory or block barrier, and 32× the columns per reduction; a block per
// row when there are few (ProxyAnchor's C proxies as rows).
// s holds rows row0 .. row0 + rows − 1 of S (a row block; row0 = 0 for all of them) and
// columns start .. start + len − 1; labels, states and the loss take global row indices.
template <class Loss, typename T, int kRowWarps>
__global__ void fold_rows_kernel(const T* __restrict__ s, int64_t rows, int64_t len,
                                 int64_t row0, int64_t start, const int64_t* __restrict__ yr,
                                 const int64_t* __restrict__ yc, bool exclude_diag, Loss loss,
                                 typename Loss::State* state) {
  using State = typename Loss::State;
  constexpr int kRowThreads = 32 * kRowWarps, kRowsPerBlock = kThreads / kRowThreads;
  static_assert(kThreads % kRowThreads == 0, "a block holds whole rows");
  const int t = threadIdx.x % kRowThreads, lane = threadIdx.x % 32;
  const int64_t i = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int64_t gi = row0 + i;
  State local = State::empty();
  if (i < rows) {
    const T* row = s + i * len;
    const int64_t yi = yr[gi];
    for (int64_t j = t; j < len; j += kRowThreads) {
      const int kind = pair_kind(yi, yc, gi, start + j, exclude_diag);
      if (kind >= 0) fold_entry(loss, local, row[j], kind == 1, gi, start + j);
    }
  }
  for (int off = 16; off > 0; off >>= 1) {  // every lane shuffles (full mask)
    const State other = shfl_down_state(local, off);
    if (lane < off) local.merge(other);
  }
  if constexpr (kRowWarps == 1) {
    if (lane == 0 && i < rows) state[gi].merge(local);
  } else {
    __shared__ State partial[kThreads / 32];
    if (lane == 0) partial[threadIdx.x / 32] = local;
    __syncthreads();
    if (t == 0 && i < rows) {
      const int w0 = (threadIdx.x / 32);
      State acc = partial[w0];
      for (int w = 1; w < kRowWarps; ++w) acc.merge(partial[w0 + w]);
      state[gi].merge(acc);
    }
  }
}

// G in place: grid.y over rows (strided), grid.x over the chunk's columns; row and column
// come from the grid, not from dividing a flat index (64-bit division costs ~100 instructions
// per entry on the GPU). Rows and columns as fold_rows_kernel's. kSym (the batch against
// itself, grad_self): the entry becomes H_ij = G_ij + G_ji, the loss's gradient of s_ij for
// row i plus that of s_ji = s_ij for row j (pair kinds are symmetric there).
template <class Loss, typename T, bool kSym = false>
__global__ void grad_entries_kernel(T* __restrict__ s, int64_t rows, int64_t len, int64_t row0,
                                    int64_t start, const int64_t* __restrict__ yr,
                                    const int64_t* __restrict__ yc, bool exclude_diag,
                                    Loss loss) {
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    T* row = s + i * len;
    const int64_t gi = row0 + i, yi = yr[gi];
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < len;
         j += (int64_t)gridDim.x * blockDim.x) {
      const int64_t gj = start + j;
      const int kind = pair_kind(yi, yc, gi, gj, exclude_diag);
      if (kind < 0) {
        row[j] = T(0);
        continue;
      }
      T h = grad_entry(loss, row[j], kind == 1, gi, gj);
      if constexpr (kSym) h += grad_entry(loss, row[j], kind == 1, gj, gi);
      row[j] = h;
    }
  }
}

template <class State>
__global__ void init_states_kernel(State* state, int64_t n, State init) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) state[i] = init;
}

// The rows' states in device memory (a byte tensor keeps the allocation with the caching
// allocator), every one set to `init`.
template <class State>
at::Tensor make_states(int64_t n, const State& init, const at::TensorOptions& opts) {
  at::Tensor buf = at::empty({std::max<int64_t>(n, 1) * (int64_t)sizeof(State)},
                             opts.dtype(at::kByte));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    init_states_kernel<State><<<(int)((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        reinterpret_cast<State*>(buf.data_ptr()), n, init);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return buf;
}

// The columns' side of a block of S of the batch against itself (fold_self): entry (i, j) is
// the pair (row start + j, reference row0 + i). grid.x over tiles of kColTile columns, grid.y
// over segments of kSegRows rows; a thread folds every kRowLanes-th row of its segment in its
// column (a warp reads kColTile consecutive entries of a row: coalesced), the block's row lanes
// merge in shared memory in a fixed order, and the segment's state goes to
// part[segment · len + column] (no atomics: merge_cols_kernel sums the segments in order).
constexpr int kColTile = 32, kRowLanes = kThreads / kColTile;
constexpr int64_t kSegRows = 256;

template <class Loss, typename T>
__global__ void fold_cols_kernel(const T* __restrict__ s, int64_t rows, int64_t len, int64_t row0,
                                 int64_t start, const int64_t* __restrict__ y, Loss loss,
                                 typename Loss::State* part) {
  using State = typename Loss::State;
  const int c = threadIdx.x % kColTile, lane_row = threadIdx.x / kColTile;
  const int64_t j = (int64_t)blockIdx.x * kColTile + c;
  const int64_t seg0 = (int64_t)blockIdx.y * kSegRows;
  const int64_t seg_end = seg0 + kSegRows < rows ? seg0 + kSegRows : rows;
  State local = State::empty();
  if (j < len) {
    const int64_t gj = start + j, yj = y[gj];
    for (int64_t i = seg0 + lane_row; i < seg_end; i += kRowLanes) {
      const int64_t gi = row0 + i;
      const int kind = pair_kind(yj, y, gj, gi, true);
      if (kind >= 0) fold_entry(loss, local, s[i * len + j], kind == 1, gj, gi);
    }
  }
  __shared__ State lanes[kRowLanes][kColTile];
  lanes[lane_row][c] = local;
  __syncthreads();
  if (lane_row == 0 && j < len) {
    State acc = lanes[0][c];
    for (int l = 1; l < kRowLanes; ++l) acc.merge(lanes[l][c]);
    part[(int64_t)blockIdx.y * len + j] = acc;
  }
}

template <class State>
__global__ void merge_cols_kernel(const State* __restrict__ part, int64_t segs, int64_t len,
                                  int64_t start, State* state) {
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= len) return;
  State acc = part[j];
  for (int64_t g = 1; g < segs; ++g) acc.merge(part[g * len + j]);
  state[start + j].merge(acc);
}

// One row fold of s (rows row0 .. row0 + rows − 1 of S against columns start ..): a warp per
// row once the rows give every multiprocessor 32 warps or more, else a block per row.
template <class Loss, typename T>
void launch_fold_rows(const T* s, int64_t rows, int64_t len, int64_t row0, int64_t start,
                      const int64_t* yr, const int64_t* yc, bool exclude_diag, const Loss& loss,
                      typename Loss::State* state, cudaStream_t stream) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (rows >= 32 * (int64_t)sms) {
    fold_rows_kernel<Loss, T, 1>
        <<<(unsigned)((rows + kThreads / 32 - 1) / (kThreads / 32)), kThreads, 0, stream>>>(
            s, rows, len, row0, start, yr, yc, exclude_diag, loss, state);
  } else {
    fold_rows_kernel<Loss, T, kThreads / 32><<<(unsigned)rows, kThreads, 0, stream>>>(
        s, rows, len, row0, start, yr, yc, exclude_diag, loss, state);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Forward of the batch against itself (R = X, self pairs excluded): the blocks I ≤ J of S,
// block × block each, folded into their rows' states and, off the diagonal, into their
// columns' (rows J, which S_JI = S_IJᵀ would have given). (nb + 1) / (2 nb) of S's products
// for nb block rows; every entry folded for both of its rows as before.
template <class Loss, typename T>
void fold_self(const at::Tensor& x, const at::Tensor& labels, int64_t block, const Loss& loss,
               typename Loss::State* state) {
  using State = typename Loss::State;
  const int64_t B = x.size(0);
  if (B == 0) return;
  block = std::min(block, B);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t max_segs = (block + kSegRows - 1) / kSegRows;
  at::Tensor part_buf = at::empty({max_segs * block * (int64_t)sizeof(State)},
                                  x.options().dtype(at::kByte));
  auto* part = reinterpret_cast<State*>(part_buf.data_ptr());
  for (int64_t i0 = 0; i0 < B; i0 += block) {
    const int64_t ni = std::min(block, B - i0);
    const at::Tensor xi = x.narrow(0, i0, ni);
    for (int64_t j0 = i0; j0 < B; j0 += block) {
      const int64_t nj = std::min(block, B - j0);
      at::Tensor s = at::mm(xi, x.narrow(0, j0, nj).t()).contiguous();
      const T* sp = s.data_ptr<T>();
      launch_fold_rows<Loss, T>(sp, ni, nj, i0, j0, y, y, true, loss, state, stream);
      if (j0 == i0) continue;  // a diagonal block holds both sides of its pairs
      const int64_t segs = (ni + kSegRows - 1) / kSegRows;
      fold_cols_kernel<Loss, T>
          <<<dim3((unsigned)((nj + kColTile - 1) / kColTile), (unsigned)segs), kThreads, 0,
             stream>>>(sp, ni, nj, i0, j0, y, loss, part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_cols_kernel<State><<<(unsigned)((nj + kThreads - 1) / kThreads), kThreads, 0,
                                 stream>>>(part, segs, nj, j0, state);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Forward: fold every chunk of S = x rᵀ into the rows' states. self_block > 0: the batch
// against itself (x is r, labels are ref_labels, self pairs excluded) over S's symmetric
// blocks of self_block rows (fold_self; chunk is not used then).
template <class Loss, typename T>
void fold_all(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
              const at::Tensor& ref_labels, bool exclude_diag, int64_t chunk, const Loss& loss,
              typename Loss::State* state, int64_t self_block = 0) {
  if (self_block > 0) {
    fold_self<Loss, T>(x, labels, self_block, loss, state);
    return;
  }
  const int64_t B = x.size(0), M = r.size(0);
  if (B == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* yr = labels.data_ptr<int64_t>();
  const int64_t* yc = ref_labels.data_ptr<int64_t>();
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t len = std::min(chunk, M - start);
    at::Tensor s = at::mm(x, r.narrow(0, start, len).t()).contiguous();
    launch_fold_rows<Loss, T>(s.data_ptr<T>(), B, len, 0, start, yr, yc, exclude_diag, loss,
                              state, stream);
  }
}

// Backward: (dx, dr) from each recomputed chunk turned into its G block; dr stays zero
// unless need_dr (the Gᵀ x products are a third of the work).
template <class Loss, typename T>
std::tuple<at::Tensor, at::Tensor> grad_all(const at::Tensor& x, const at::Tensor& r,
                                            const at::Tensor& labels,
                                            const at::Tensor& ref_labels, bool exclude_diag,
                                            int64_t chunk, const Loss& loss,
                                            bool need_dr = true) {
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  if (B == 0) return {dx, dr};
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < M; start += chunk) {
    const int64_t len = std::min(chunk, M - start);
    at::Tensor rc = r.narrow(0, start, len);
    at::Tensor s = at::mm(x, rc.t()).contiguous();  // becomes G in place
    const dim3 grid((unsigned)((len + kThreads - 1) / kThreads),
                    (unsigned)std::min<int64_t>(B, 65535));
    grad_entries_kernel<Loss, T><<<grid, kThreads, 0, stream>>>(
        s.data_ptr<T>(), B, len, 0, start, labels.data_ptr<int64_t>(),
        ref_labels.data_ptr<int64_t>(), exclude_diag, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dx.addmm_(s, rc);
    if (need_dr) dr.narrow(0, start, len).addmm_(s.t(), x);
  }
  return {dx, dr};
}

// H of a diagonal block of S (rows row0 .. row0 + n − 1 against themselves, n × n, in place):
// H_ij = H_ji = g_i(s_ij) + g_j(s_ji), each row's term at the entry the forward folded it
// from (fold_rows_kernel reads row j of the block: s_ji), as the CPU self ops do. kSym would
// take row j's term at s_ij here, and a product whose S_ij and S_ji differ by a rounding would
// let a tie (a miner's bound or a hinge met exactly, as duplicate rows do) fall one way in the
// forward and the other in the backward. A block of kTile × kTileRows threads takes the tile
// pair (I, J ≥ I) of kTile × kTile entries through shared memory, so that both tiles are read
// and written coalesced; blocks below the diagonal return at once.
constexpr int kTile = 32, kTileRows = 8;

template <class Loss, typename T>
__global__ void grad_diag_kernel(T* __restrict__ s, int64_t n, int64_t row0,
                                 const int64_t* __restrict__ y, Loss loss) {
  const int64_t ti = blockIdx.y, tj = blockIdx.x;
  if (ti > tj) return;
  __shared__ T a[kTile][kTile + 1];  // tile (I, J), then H there
  __shared__ T b[kTile][kTile + 1];  // tile (J, I)
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  for (int r = ty; r < kTile; r += kTileRows) {
    if (i0 + r < n && j0 + tx < n) a[r][tx] = s[(i0 + r) * n + j0 + tx];
    if (j0 + r < n && i0 + tx < n) b[r][tx] = s[(j0 + r) * n + i0 + tx];
  }
  __syncthreads();
  for (int r = ty; r < kTile; r += kTileRows) {
    const int64_t gi = row0 + i0 + r, gj = row0 + j0 + tx;
    if (i0 + r >= n || j0 + tx >= n) continue;
    const int kind = pair_kind(y[gi], y, gi, gj, true);
    a[r][tx] = kind < 0 ? T(0)
                        : grad_entry(loss, a[r][tx], kind == 1, gi, gj) +
                              grad_entry(loss, b[tx][r], kind == 1, gj, gi);
  }
  __syncthreads();
  for (int r = ty; r < kTile; r += kTileRows) {
    if (i0 + r < n && j0 + tx < n) s[(i0 + r) * n + j0 + tx] = a[r][tx];
    if (ti != tj && j0 + r < n && i0 + tx < n) s[(j0 + r) * n + i0 + tx] = a[tx][r];
  }
}

// Backward of the batch against itself (R = X, self pairs excluded; the *_self_bwd ops): S
// and its pair kinds are symmetric, so ∂L/∂X = (G + Gᵀ) X. Over the blocks (I, J ≥ I) of S:
// H_IJ = G_IJ + G_JIᵀ (grad_entries_kernel's kSym off the diagonal, grad_diag_kernel on
// it), dX_I += H_IJ X_J and, off the
// diagonal, dX_J += H_IJᵀ X_I (cuBLAS reads the transpose in place). For nb block rows,
// (nb + 1) / (2 nb) of S's products and one product with H, where grad_all with r = x takes
// 3 (S, G X, Gᵀ X); with fold_self's, 2 + 1/nb where the general op takes 4.
// A block's tile is block × block; a diagonal block's H comes from grad_diag_kernel.
template <class Loss, typename T>
at::Tensor grad_self(const at::Tensor& x, const at::Tensor& labels, int64_t block,
                     const Loss& loss) {
  const int64_t B = x.size(0);
  at::Tensor dx = at::zeros_like(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i0 = 0; i0 < B; i0 += block) {
    const int64_t ni = std::min(block, B - i0);
    const at::Tensor xi = x.narrow(0, i0, ni);
    for (int64_t j0 = i0; j0 < B; j0 += block) {
      const int64_t nj = std::min(block, B - j0);
      const at::Tensor xj = x.narrow(0, j0, nj);
      at::Tensor h = at::mm(xi, xj.t()).contiguous();  // S_IJ, then H_IJ in place
      const dim3 grid((unsigned)((nj + kThreads - 1) / kThreads),
                      (unsigned)std::min<int64_t>(ni, 65535));
      if (j0 == i0) {
        const unsigned tiles = (unsigned)((ni + kTile - 1) / kTile);
        grad_diag_kernel<Loss, T><<<dim3(tiles, tiles), dim3(kTile, kTileRows), 0, stream>>>(
            h.data_ptr<T>(), ni, i0, y, loss);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        grad_entries_kernel<Loss, T, true><<<grid, kThreads, 0, stream>>>(
            h.data_ptr<T>(), ni, nj, i0, j0, y, y, /*exclude_diag=*/true, loss);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      dx.narrow(0, i0, ni).addmm_(h, xj);
      if (j0 != i0) dx.narrow(0, j0, nj).addmm_(h.t(), xi);
    }
  }
  return dx;
}

// The op entry points of a loss with a TwoSideLse row state (Circle, GeneralizedLifted): the
// checks, the device guard, contiguous inputs, the dtype dispatch, then fold_all and a
// finish kernel (rows[i] = loss.finish(lse⁺_i, lse⁻_i), the two log-sum-exps kept for the
// backward), or grad_all. make_loss(g, lse⁺, lse⁻) builds the loss for one dtype from the
// backward's per-row pointers (const T*; all null for the forward), so one lambda serves both.
template <class Loss, typename T>
__global__ void two_side_finish_kernel(const TwoSideLse<T>* state, int64_t n, Loss loss,
                                       T* rows, T* lse_pos, T* lse_neg) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T lp = state[i].pos.value(), ln = state[i].neg.value();  // −inf for an empty side
  lse_pos[i] = lp;
  lse_neg[i] = ln;
  rows[i] = loss.finish(lp, ln);
}

template <class MakeLoss>
std::tuple<at::Tensor, at::Tensor, at::Tensor> two_side_fwd(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, int64_t chunk, MakeLoss make_loss,
    int64_t self_block = 0) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor rows = at::empty({B}, x.options()), lp = at::empty_like(rows),
             ln = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_side_fwd_cuda", [&] {
    using T = scalar_t;
    const T* none = nullptr;
    const auto loss = make_loss(none, none, none);
    using Loss = std::remove_cv_t<decltype(loss)>;
    at::Tensor buf = make_states(B, TwoSideLse<T>::empty(), x.options());
    auto* state = reinterpret_cast<TwoSideLse<T>*>(buf.data_ptr());
    fold_all<Loss, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, state, self_block);
    if (B > 0) {
      two_side_finish_kernel<Loss, T><<<(int)((B + kThreads - 1) / kThreads), kThreads, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
          state, B, loss, rows.data_ptr<T>(), lp.data_ptr<T>(), ln.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, lp, ln};
}

template <class MakeLoss>
std::tuple<at::Tensor, at::Tensor> two_side_bwd(
    const at::Tensor& grad_rows, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, int64_t chunk, bool need_dr,
    MakeLoss make_loss) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  check_row_vec(grad_rows, x_, "grad_rows");
  check_row_vec(lse_pos_, x_, "lse_pos");
  check_row_vec(lse_neg_, x_, "lse_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows.to(x.scalar_type()).contiguous();
  auto lp = lse_pos_.to(x.scalar_type()).contiguous();
  auto ln = lse_neg_.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_side_bwd_cuda", [&] {
    using T = scalar_t;
    const T *gp = g.data_ptr<T>(), *lpp = lp.data_ptr<T>(), *lnp = ln.data_ptr<T>();
    const auto loss = make_loss(gp, lpp, lnp);
    using Loss = std::remove_cv_t<decltype(loss)>;
    out = grad_all<Loss, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, need_dr);
  });
  return out;
}

// The *_self_fwd / *_self_bwd ops of such a loss (the batch against itself, self pairs
// excluded): both take S's symmetric blocks of block rows (fold_self, grad_self).
template <class MakeLoss>
std::tuple<at::Tensor, at::Tensor, at::Tensor> two_side_self_fwd(const at::Tensor& x,
                                                                 const at::Tensor& labels,
                                                                 int64_t block,
                                                                 MakeLoss make_loss) {
  check_block(block);
  return two_side_fwd(x, x, labels, labels, true, block, make_loss, block);
}

// The backward of a self op whose loss reads N per-row vectors (upstream gradients, saved
// statistics; `names` for the checks' messages): make_loss(const T*...) builds the loss from
// them in x's dtype, then grad_self.
template <size_t N, class MakeLoss>
at::Tensor rows_self_bwd(const at::Tensor& x_, const at::Tensor& labels_, int64_t block,
                         const std::array<const at::Tensor*, N>& rows,
                         const std::array<const char*, N>& names, MakeLoss make_loss) {
  check_block(block);
  check_cuda_pair_call(x_, x_, labels_, labels_, block);
  for (size_t k = 0; k < N; ++k) check_row_vec(*rows[k], x_, names[k]);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), labels = labels_.contiguous();
  std::array<at::Tensor, N> vecs;
  for (size_t k = 0; k < N; ++k) vecs[k] = rows[k]->to(x.scalar_type()).contiguous();
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "self_bwd_cuda", [&] {
    using T = scalar_t;
    std::array<const T*, N> ptrs;
    for (size_t k = 0; k < N; ++k) ptrs[k] = vecs[k].template data_ptr<T>();
    const auto loss = std::apply(make_loss, ptrs);
    using Loss = std::remove_cv_t<decltype(loss)>;
    dx = grad_self<Loss, T>(x, labels, block, loss);
  });
  return dx;
}

template <class MakeLoss>
at::Tensor two_side_self_bwd(const at::Tensor& grad_rows, const at::Tensor& x,
                             const at::Tensor& labels, const at::Tensor& lse_pos,
                             const at::Tensor& lse_neg, int64_t block, MakeLoss make_loss) {
  return rows_self_bwd<3>(x, labels, block, {&grad_rows, &lse_pos, &lse_neg},
                          {"grad_rows", "lse_pos", "lse_neg"}, make_loss);
}

}  // namespace cuda_pairs
}  // namespace metrix_ops
