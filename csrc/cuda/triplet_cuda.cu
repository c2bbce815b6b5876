// CUDA implementations of the fused triplet-margin ops (the schemas of
// csrc/cpu/triplet_cpu.cpp and triplet_mined_cpu.cpp, so one Python glue serves both devices):
// per anchor the sum over all (p, n), or over those a TripletMarginMiner keeps, of
// [(k_ap − k_an) + m]₊ (softplus with smooth_loss), the number of those > 0 and the number of
// triplets (kept), without enumerating triplets or holding the B×M matrix.
//
// Per chunk of anchor rows: the block of values through ATen (cuBLAS products, or cdist for
// L2, as the CPU ops), then each row's positive keys sorted by one top-k over the chunk
// (the rows' positives first, +inf elsewhere; k = the chunk's largest positive count, a
// handful in P×K batches) and their suffix sums in fp64. For a negative, the positives the
// miner keeps are a window of sorted ranks and the active ones a suffix (common/triplet.h), so
// its kept active triplets are a window [lo, hi): a warp per row takes the negatives in
// strided columns, each by a few binary searches and a suffix-sum difference — the CPU ops'
// search path, the same per-element header code.
// Backward: the chunk is recomputed and turned into G in place. Negative j gets
// −g (hi − lo) dk/ds; a positive of sorted rank t gets g (#negatives whose window holds t)
// dk/ds, the running sum of a per-row difference array over the ranks (integer atomics: the
// same counts whatever the order); with smooth_loss each kept triplet's softplus' instead of
// 1, accumulated per rank by floating-point atomics (sums whose order, and so last bits, may
// vary between runs). Then dx += G r, dr += Gᵀ x, and for L2 cdist's radial part
// (add_triplet_block_grad).
// Extra memory per chunk: the block, its mask and keys, and chunk × k sorted keys.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/triplet.h"

namespace metrix_ops {

namespace {

constexpr int kWarps = 8;  // rows (one warp each) per block of 256 threads
constexpr int kThreads = 32 * kWarps;

void check_call(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                const at::Tensor& ref_labels, bool exclude_diag, double margin, int64_t chunk) {
  check_triplet_inputs(x, r, labels, ref_labels, exclude_diag, margin, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
}

// Which triplets count: all (mined = false), or those TripletMarginMiner(m2, kind) keeps;
// smooth: softplus terms (smooth_loss)
template <typename T>
struct Rule {
  T mg;           // the loss's margin
  double margin;  // the same in double, for the sums
  bool mined;
  int kind;
  T m2;
  bool smooth;
};

// A negative's window (common/triplet.h): the kept ranks [klo, khi) and the kept active ones
// [lo, hi) of the row's n sorted positive keys kp
struct Window {
  long klo, khi, lo, hi;
};

template <typename T>
__device__ __forceinline__ Window neg_window(const T* kp, long n, T kn, const Rule<T>& rule) {
  long klo = 0, khi = n;
  if (rule.mined) {
    tri_mined_window(kp, n, kn, rule.kind, rule.m2, &klo, &khi);
    khi = khi > klo ? khi : klo;
  }
  const long first = tri_first_active(kp, n, kn, rule.mg);
  const long lo = first > klo ? first : klo;
  return {klo, khi, lo, khi > lo ? khi : lo};
}

// A chunk's rows' positives sorted by key: per row its count np, keys (len × k, ascending,
// +inf past np), their columns, and fp64 suffix sums suffix[t] = Σ_{q ≥ t} keys[q]
// (len × (k + 1): 0 from np on).
struct SortedRows {
  at::Tensor np, keys, cols, suffix;
  int64_t k = 0;
};

SortedRows sort_positives(const at::Tensor& s, const at::Tensor& yc,
                          const at::Tensor& ref_labels, int64_t start, bool exclude_diag,
                          bool cosine) {
  const int64_t len = s.size(0);
  at::Tensor pos = yc.unsqueeze(1).eq(ref_labels.unsqueeze(0));  // len × M
  if (exclude_diag) pos.narrow(1, start, len).diagonal().fill_(false);
  SortedRows out;
  out.np = pos.sum(1);
  out.k = s.size(1) == 0 ? 0 : out.np.max().item<int64_t>();
  if (out.k == 0) return out;
  const at::Tensor key = cosine ? s.neg() : s;  // tri_key: −s is exact
  const at::Tensor masked =
      at::where(pos, key, at::full({}, std::numeric_limits<double>::infinity(), s.options()));
  std::tie(out.keys, out.cols) = at::topk(masked, out.k, 1, /*largest=*/false, /*sorted=*/true);
  out.keys = out.keys.contiguous();
  out.cols = out.cols.contiguous();
  // finite keys only (the padding is +inf): the suffix sums of each row's own positives
  const at::Tensor real = at::where(out.keys.isinf(), at::zeros({}, out.keys.options()),
                                    out.keys).to(at::kDouble);
  out.suffix = at::pad(real, {0, 1}).flip({1}).cumsum(1).flip({1}).contiguous();
  return out;
}

// Sum of doubles and of counts over a warp (every lane ends with the totals).
__device__ __forceinline__ void warp_sum(double& v, long long& c) {
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
    c += __shfl_xor_sync(0xffffffffu, c, off);
  }
}

// Forward of one chunk: a warp per row, lanes over strided columns (coalesced reads).
template <typename T>
__global__ void fwd_rows_kernel(const T* __restrict__ s, int64_t len, int64_t m, int64_t start,
                                const int64_t* __restrict__ yc, const int64_t* __restrict__ yr,
                                bool exclude_diag, bool cosine, Rule<T> rule,
                                const int64_t* __restrict__ np, const T* __restrict__ keys,
                                const double* __restrict__ suffix, int64_t k,
                                T* __restrict__ rows, int64_t* __restrict__ nonzero,
                                int64_t* __restrict__ kept) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= len) return;  // the whole warp: i is the warp's
  const int64_t n = np[i], li = yc[i], self = exclude_diag ? start + i : -1;
  const T* row = s + i * m;
  const T* kp = keys + i * k;
  const double* suf = suffix + i * (k + 1);
  double sum = 0;
  long long active = 0, nkept = 0;
  if (n > 0) {
    for (int64_t j = lane; j < m; j += 32) {
      if (j == self || yr[j] == li) continue;
      const T kn = tri_key(row[j], cosine);
      const Window w = neg_window(kp, (long)n, kn, rule);
      nkept += w.khi - w.klo;
      if (rule.smooth) {  // softplus of every kept triplet: not linear in the keys
        for (long t = w.klo; t < w.khi; ++t) {
          const T term = tri_softplus(tri_violation(kp[t], kn, rule.mg));
          sum += double(term);
          active += term > T(0);
        }
      } else if (w.hi > w.lo) {
        sum += (suf[w.lo] - suf[w.hi]) + double(w.hi - w.lo) * (rule.margin - double(kn));
        active += w.hi - w.lo;
      }
    }
  }
  warp_sum(sum, active);
  for (int off = 16; off > 0; off >>= 1) nkept += __shfl_xor_sync(0xffffffffu, nkept, off);
  if (lane == 0) {
    rows[start + i] = T(sum);
    nonzero[start + i] = active;
    if (kept != nullptr) kept[start + i] = nkept;
  }
}

// Backward, negatives: G in place (positives and the self pair 0 for now); each negative's
// window counted in the row's difference array diff (len × (k + 1)), or with smooth_loss
// its kept triplets' softplus' added per rank to wpos (len × (k + 1)).
template <typename T>
__global__ void grad_neg_kernel(T* __restrict__ s, int64_t len, int64_t m, int64_t start,
                                const int64_t* __restrict__ yc, const int64_t* __restrict__ yr,
                                bool exclude_diag, bool cosine, Rule<T> rule,
                                const int64_t* __restrict__ np, const T* __restrict__ keys,
                                int64_t k, const T* __restrict__ g, int* __restrict__ diff,
                                T* __restrict__ wpos) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= len) return;
  const int64_t n = np[i], li = yc[i], self = exclude_diag ? start + i : -1;
  const T gi = g[start + i];
  const bool live = n > 0 && gi != T(0);
  T* row = s + i * m;
  const T* kp = keys + i * k;
  for (int64_t j = lane; j < m; j += 32) {
    if (!live || j == self || yr[j] == li) {
      row[j] = T(0);
      continue;
    }
    const T kn = tri_key(row[j], cosine);
    const Window win = neg_window(kp, (long)n, kn, rule);
    T w = T(win.hi - win.lo);
    if (rule.smooth) {
      w = T(0);
      for (long t = win.klo; t < win.khi; ++t) {
        const T d = tri_softplus_grad(tri_violation(kp[t], kn, rule.mg));
        atomicAdd(wpos + i * (k + 1) + t, d);
        w += d;
      }
    } else if (win.hi > win.lo) {
      atomicAdd(diff + i * (k + 1) + win.lo, 1);
      atomicAdd(diff + i * (k + 1) + win.hi, -1);
    }
    row[j] = -gi * w * tri_key_grad(kn, cosine);
  }
}

// Backward, positives: rank t of row i gets g w_t dk/ds, w_t its weight: the running sum of
// the difference array (active: len × (k + 1), inclusive cumsum), or wpos with smooth_loss.
template <typename T>
__global__ void grad_pos_kernel(T* __restrict__ s, int64_t len, int64_t m, int64_t start,
                                bool cosine, const int64_t* __restrict__ np,
                                const T* __restrict__ keys, const int64_t* __restrict__ cols,
                                int64_t k, const int64_t* __restrict__ active,
                                const T* __restrict__ wpos, const T* __restrict__ g) {
  for (int64_t i = blockIdx.y; i < len; i += gridDim.y) {
    const T gi = g[start + i];
    const int64_t n = np[i];
    if (gi == T(0)) continue;  // the row is all zeros already
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < n;
         t += (int64_t)gridDim.x * blockDim.x) {
      const T w = wpos != nullptr ? wpos[i * (k + 1) + t] : T(active[i * (k + 1) + t]);
      s[i * m + cols[i * k + t]] = gi * w * tri_key_grad(keys[i * k + t], cosine);
    }
  }
}

unsigned row_blocks(int64_t len) { return (unsigned)((len + kWarps - 1) / kWarps); }

// Forward of both ops: (loss sums, #terms > 0, #triplets: all of them, or those kept)
std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_fwd(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double margin, bool mined,
    int64_t mine_kind, double mine_margin, bool smooth, int64_t chunk) {
  check_call(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  // fp16/bf16 are computed in fp32 (acc_type); fp32 and fp64 as given
  auto x = x_.to(acc_type(x_)).contiguous(), r = r_.to(acc_type(x_)).contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor nonzero = at::zeros({B}, labels.options()), count = at::zeros_like(nonzero);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_fwd_cuda", [&] {
    using T = scalar_t;
    const Rule<T> rule{T(margin), margin, mined, int(mine_kind), T(mine_margin), smooth};
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      const at::Tensor yc = labels.narrow(0, start, len);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine);
      const SortedRows p = sort_positives(s, yc, ref_labels, start, exclude_diag, cosine);
      if (!mined)  // every (p, n): np · nn per row
        count.narrow(0, start, len).copy_(p.np * (M - p.np - (exclude_diag ? 1 : 0)));
      if (p.k == 0) continue;  // no positives in the chunk: every row 0
      fwd_rows_kernel<T><<<row_blocks(len), kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, M, start, yc.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(),
          exclude_diag, cosine, rule, p.np.data_ptr<int64_t>(), p.keys.data_ptr<T>(),
          p.suffix.data_ptr<double>(), p.k, rows.data_ptr<T>(), nonzero.data_ptr<int64_t>(),
          mined ? count.data_ptr<int64_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, nonzero, count};
}

std::tuple<at::Tensor, at::Tensor> triplet_bwd(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, bool exclude_diag, bool cosine,
    double margin, bool mined, int64_t mine_kind, double mine_margin, bool smooth,
    int64_t chunk) {
  check_call(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  check_row_vec(grad_rows_, x_, "grad_rows");
  // smooth_loss' float atomics (wpos) add in the GPU's order: as torch's own such kernels,
  // raise (or warn) under torch.use_deterministic_algorithms(True)
  if (smooth)
    at::globalContext().alertNotDeterministic("triplet backward with smooth_loss (CUDA)");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.to(acc_type(x_)).contiguous(), r = r_.to(acc_type(x_)).contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows_.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  at::Tensor col_sums = at::zeros({M}, x.options());  // (L2: add_triplet_block_grad)
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_bwd_cuda", [&] {
    using T = scalar_t;
    const Rule<T> rule{T(margin), margin, mined, int(mine_kind), T(mine_margin), smooth};
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      const at::Tensor yc = labels.narrow(0, start, len);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine);  // becomes G in place
      const SortedRows p = sort_positives(s, yc, ref_labels, start, exclude_diag, cosine);
      if (p.k == 0) continue;  // no positives: no triplet, G = 0
      at::Tensor diff = at::zeros({len, p.k + 1}, labels.options().dtype(at::kInt));
      at::Tensor wpos = smooth ? at::zeros({len, p.k + 1}, x.options()) : at::Tensor();
      grad_neg_kernel<T><<<row_blocks(len), kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, M, start, yc.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(),
          exclude_diag, cosine, rule, p.np.data_ptr<int64_t>(), p.keys.data_ptr<T>(), p.k,
          g.data_ptr<T>(), diff.data_ptr<int>(), smooth ? wpos.data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor active = diff.cumsum(1, at::kLong).contiguous();
      const dim3 grid((unsigned)((p.k + kThreads - 1) / kThreads),
                      (unsigned)std::min<int64_t>(len, 65535));
      grad_pos_kernel<T><<<grid, kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, M, start, cosine, p.np.data_ptr<int64_t>(), p.keys.data_ptr<T>(),
          p.cols.data_ptr<int64_t>(), p.k, active.data_ptr<int64_t>(),
          smooth ? wpos.data_ptr<T>() : nullptr, g.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      add_triplet_block_grad(dx, dr, col_sums, s, x, r, start, len, cosine);  // (as the CPU ops)
    }
  });
  finish_triplet_grad(dr, col_sums, r, cosine);
  return {dx.to(x_.scalar_type()), dr.to(r_.scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_all_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, bool cosine, double margin,
    int64_t chunk, bool raw_sq) {
  TORCH_CHECK(!raw_sq, "triplet_all_fwd: raw_sq=True (rows of any norm) is CPU-only");
  return triplet_fwd(x, r, labels, ref_labels, exclude_diag, cosine, margin, false, 0, 0.0,
                     false, chunk);
}

std::tuple<at::Tensor, at::Tensor> triplet_all_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, bool exclude_diag, bool cosine,
    double margin, int64_t chunk, bool raw_sq) {
  TORCH_CHECK(!raw_sq, "triplet_all_bwd: raw_sq=True (rows of any norm) is CPU-only");
  return triplet_bwd(grad_rows, x, r, labels, ref_labels, exclude_diag, cosine, margin, false,
                     0, 0.0, false, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_mined_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, bool cosine, double margin,
    int64_t mine_kind, double mine_margin, bool smooth, int64_t chunk, bool raw_sq) {
  TORCH_CHECK(!raw_sq, "triplet_mined_fwd: raw_sq=True (rows of any norm) is CPU-only");
  check_mine_rule(mine_kind, mine_margin);
  return triplet_fwd(x, r, labels, ref_labels, exclude_diag, cosine, margin, true, mine_kind,
                     mine_margin, smooth, chunk);
}

std::tuple<at::Tensor, at::Tensor> triplet_mined_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, bool exclude_diag, bool cosine,
    double margin, int64_t mine_kind, double mine_margin, bool smooth, int64_t chunk,
    bool raw_sq) {
  TORCH_CHECK(!raw_sq, "triplet_mined_bwd: raw_sq=True (rows of any norm) is CPU-only");
  check_mine_rule(mine_kind, mine_margin);
  return triplet_bwd(grad_rows, x, r, labels, ref_labels, exclude_diag, cosine, margin, true,
                     mine_kind, mine_margin, smooth, chunk);
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("triplet_all_fwd", &triplet_all_fwd_cuda);
  m.impl("triplet_all_bwd", &triplet_all_bwd_cuda);
  m.impl("triplet_mined_fwd", &triplet_mined_fwd_cuda);
  m.impl("triplet_mined_bwd", &triplet_mined_bwd_cuda);
}

}  // namespace metrix_ops
