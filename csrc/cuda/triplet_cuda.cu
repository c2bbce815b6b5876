// CUDA implementation of the fused all-triplets margin ops (the schemas of
// csrc/cpu/triplet_cpu.cpp, so one Python glue serves both devices): per anchor the sum over
// all (p, n) of [(k_ap − k_an) + m]₊, the number of those > 0 and the number of triplets,
// without enumerating triplets or holding the B×M matrix.
//
// Per chunk of anchor rows: the block of values through ATen (cuBLAS products, or cdist for
// L2, as the CPU op), then each row's positive keys sorted by one top-k over the chunk
// (the rows' positives first, +inf elsewhere; k = the chunk's largest positive count, a
// handful in P×K batches) and their suffix sums in fp64. For a negative, the active
// positives are a suffix of the sorted keys (common/triplet.h): a warp per row takes the
// negatives in strided columns, each by one binary search (tri_count_pos) and a suffix
// sum — the CPU op's search path, the same per-element header code.
// Backward: the chunk is recomputed and turned into G in place. Negative j gets
// −g (#active positives) dk/ds; a positive of sorted rank t gets g (#negatives whose active
// suffix starts at or before t) dk/ds, the running sum of a per-row histogram of first ranks
// (integer atomics: the same counts whatever the order), then dx += G r, dr += Gᵀ x.
// Extra memory per chunk: the block, its mask and keys, and chunk × k sorted keys.
#include <ATen/ATen.h>
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

// A chunk's rows' positives sorted by key: per row its count np, keys (len × k, ascending,
// +inf past np), their columns, and fp64 suffix sums suffix[t] = Σ_{q ≥ t} keys[q].
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
  out.suffix = real.flip({1}).cumsum(1).flip({1}).contiguous();
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
                                bool exclude_diag, bool cosine, T mg, double margin,
                                const int64_t* __restrict__ np, const T* __restrict__ keys,
                                const double* __restrict__ suffix, int64_t k,
                                T* __restrict__ rows, int64_t* __restrict__ nonzero) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= len) return;  // the whole warp: i is the warp's
  const int64_t n = np[i], li = yc[i], self = exclude_diag ? start + i : -1;
  const T* row = s + i * m;
  const T* kp = keys + i * k;
  const double* suf = suffix + i * k;
  double sum = 0;
  long long active = 0;
  if (n > 0) {
    for (int64_t j = lane; j < m; j += 32) {
      if (j == self || yr[j] == li) continue;
      const T kn = tri_key(row[j], cosine);
      const long cnt = tri_count_pos(kp, (long)n, kn, mg);
      if (cnt > 0) {
        sum += suf[n - cnt] + double(cnt) * (margin - double(kn));
        active += cnt;
      }
    }
  }
  warp_sum(sum, active);
  if (lane == 0) {
    rows[start + i] = T(sum);
    nonzero[start + i] = active;
  }
}

// Backward, negatives: G in place (positives and the self pair 0 for now), and each
// negative's first active rank counted in hist (len × (k + 1)).
template <typename T>
__global__ void grad_neg_kernel(T* __restrict__ s, int64_t len, int64_t m, int64_t start,
                                const int64_t* __restrict__ yc, const int64_t* __restrict__ yr,
                                bool exclude_diag, bool cosine, T mg,
                                const int64_t* __restrict__ np, const T* __restrict__ keys,
                                int64_t k, const T* __restrict__ g, int* __restrict__ hist) {
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
    const long cnt = tri_count_pos(kp, (long)n, kn, mg);
    if (cnt > 0) atomicAdd(hist + i * (k + 1) + (n - cnt), 1);
    row[j] = -gi * T(cnt) * tri_key_grad(kn, cosine);
  }
}

// Backward, positives: rank t of row i gets g (#negatives active with it) dk/ds, the count
// being the running sum of the first ranks (active: len × (k + 1), inclusive cumsum).
template <typename T>
__global__ void grad_pos_kernel(T* __restrict__ s, int64_t len, int64_t m, int64_t start,
                                bool cosine, const int64_t* __restrict__ np,
                                const T* __restrict__ keys, const int64_t* __restrict__ cols,
                                int64_t k, const int64_t* __restrict__ active,
                                const T* __restrict__ g) {
  for (int64_t i = blockIdx.y; i < len; i += gridDim.y) {
    const T gi = g[start + i];
    const int64_t n = np[i];
    if (gi == T(0)) continue;  // the row is all zeros already
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < n;
         t += (int64_t)gridDim.x * blockDim.x) {
      s[i * m + cols[i * k + t]] =
          gi * T(active[i * (k + 1) + t]) * tri_key_grad(keys[i * k + t], cosine);
    }
  }
}

unsigned row_blocks(int64_t len) { return (unsigned)((len + kWarps - 1) / kWarps); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_all_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double margin,
    int64_t chunk) {
  check_call(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  // fp16/bf16 are computed in fp32 (acc_type); fp32 and fp64 as given
  auto x = x_.to(acc_type(x_)).contiguous(), r = r_.to(acc_type(x_)).contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor nonzero = at::zeros({B}, labels.options()), triplets = at::zeros_like(nonzero);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_all_fwd_cuda", [&] {
    using T = scalar_t;
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      const at::Tensor yc = labels.narrow(0, start, len);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine);
      const SortedRows p = sort_positives(s, yc, ref_labels, start, exclude_diag, cosine);
      triplets.narrow(0, start, len).copy_(p.np * (M - p.np - (exclude_diag ? 1 : 0)));
      if (p.k == 0) continue;  // no positives in the chunk: every row 0
      fwd_rows_kernel<T><<<row_blocks(len), kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, M, start, yc.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(),
          exclude_diag, cosine, T(margin), margin, p.np.data_ptr<int64_t>(), p.keys.data_ptr<T>(),
          p.suffix.data_ptr<double>(), p.k, rows.data_ptr<T>(), nonzero.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, nonzero, triplets};
}

std::tuple<at::Tensor, at::Tensor> triplet_all_bwd_cuda(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, bool exclude_diag, bool cosine,
    double margin, int64_t chunk) {
  check_call(x_, r_, labels_, ref_labels_, exclude_diag, margin, chunk);
  check_row_vec(grad_rows_, x_, "grad_rows");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.to(acc_type(x_)).contiguous(), r = r_.to(acc_type(x_)).contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows_.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), M = r.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "triplet_all_bwd_cuda", [&] {
    using T = scalar_t;
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      const at::Tensor yc = labels.narrow(0, start, len);
      at::Tensor s = triplet_value_block(x, r, start, len, cosine);  // becomes G in place
      const SortedRows p = sort_positives(s, yc, ref_labels, start, exclude_diag, cosine);
      if (p.k == 0) continue;  // no positives: no triplet, G = 0
      at::Tensor hist = at::zeros({len, p.k + 1}, labels.options().dtype(at::kInt));
      grad_neg_kernel<T><<<row_blocks(len), kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, M, start, yc.data_ptr<int64_t>(), ref_labels.data_ptr<int64_t>(),
          exclude_diag, cosine, T(margin), p.np.data_ptr<int64_t>(), p.keys.data_ptr<T>(), p.k,
          g.data_ptr<T>(), hist.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor active = hist.cumsum(1, at::kLong).contiguous();
      const dim3 grid((unsigned)((p.k + kThreads - 1) / kThreads),
                      (unsigned)std::min<int64_t>(len, 65535));
      grad_pos_kernel<T><<<grid, kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, M, start, cosine, p.np.data_ptr<int64_t>(), p.keys.data_ptr<T>(),
          p.cols.data_ptr<int64_t>(), p.k, active.data_ptr<int64_t>(), g.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dx.narrow(0, start, len).addmm_(s, r);
      dr.addmm_(s.t(), x.narrow(0, start, len));
    }
  });
  return {dx.to(x_.scalar_type()), dr.to(r_.scalar_type())};
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("triplet_all_fwd", &triplet_all_fwd_cuda);
  m.impl("triplet_all_bwd", &triplet_all_bwd_cuda);
}

}  // namespace metrix_ops
