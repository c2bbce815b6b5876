// The CUDA engine of embedding-level Metrix (pairs "pos_neg" or "anchor_neg", the batch
// against itself): per anchor a, its closed-form candidates
//
//     V(a) = { mix(x_j, x_n, λ) : j ∈ P(a), n ∈ N(a) }   (j = a itself under "anchor_neg" or
//                                                          when a has no positive),
//     s̃ = r_jn (λ s_aj + (1−λ) s_an),  r_jn = 1/‖λ x_j + (1−λ) x_n‖ from s_jn
//
// (common/metrix_mix.h), folded into a loss-given per-anchor state, and the gradient of the
// loss back into the Gram entries. No mixed point is materialised and no B×B matrix is held:
// the batch is label-sorted (the caller sorts), and per chunk of whole classes (about `chunk`
// rows) one cuBLAS product S_rows = X_rows Xᵀ holds every Gram entry its anchors' candidates
// need (an anchor's positives are rows of its own class).
//
// Forward: a warp per anchor, lanes over strided columns (its negatives), each lane looping
// over the anchor's positives; the lanes' states merge by a fixed shuffle tree.
// Backward: the chunk is recomputed, and G = ∂L/∂S_rows (R × B) is built by two kernels,
// each recomputing the candidates and their weights w = ∂L/∂s̃:
//   anchors (a warp per row a): G[a, n] += w (1−λ) r_jn over j, and G[a, j] = Σ_n w λ r_jn
//     (a warp reduction per positive j);
//   positives (a warp per row j): G[j, n] += Σ_a w ∂s̃/∂s_jn, ∂s̃/∂s_jn = −s̃ λ(1−λ) r_jn²
//     (0 where ‖v‖ is clamped).
// Every entry has one writer per kernel (a warp owns its row): no atomics, deterministic. The
// candidates are recomputed rather than stored: there are (K−1)·B per anchor. Then
// dX_rows += G X and dX += Gᵀ X_rows (cuBLAS).
//
// A Loss provides:
//   struct State { static MO_HD State empty(); MO_HD void merge(const State&); }  (POD)
//   __device__ void push(State&, T s̃) const      one candidate of the anchor being folded
//   __device__ bool live(int64_t a) const          backward: anchor a has a gradient
//   __device__ T weight(T s̃, int64_t a) const     backward: ∂L/∂s̃ of a candidate of a
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/metrix_mix.h"
#include "cuda/pair_rows.cuh"  // shfl_down_state

namespace metrix_ops {
namespace cuda_metrix {

constexpr int kWarps = 8;  // rows (one warp each) per block
constexpr int kThreads = 32 * kWarps;

// The mix's weight λ and the norm of a mixed point
template <typename T>
struct MixGeom {
  T lam;
  // 1/‖λ x_j + (1−λ) x_n‖ from s_jn, ‖v‖ clamped below at kMixEps; *clamped when it is
  __device__ __forceinline__ T inv_norm(T s_jn, bool* clamped) const {
    const T q = lam * lam + (T(1) - lam) * (T(1) - lam) + T(2) * lam * (T(1) - lam) * s_jn;
    const T eps2 = T(kMixEps) * T(kMixEps);
    *clamped = !(q > eps2);
    return *clamped ? T(1) / T(kMixEps) : T(1) / std::sqrt(q);
  }
};

// The sorted batch's layout, shared by the kernels
struct Layout {
  const int64_t* labels;  // sorted
  const int64_t* cstart;  // per row, its class's first row
  const int64_t* csize;   // per row, its class's size
  bool anchor_neg;
};

// Anchor a mixes itself with each negative (no positive to mix, or "anchor_neg")
__device__ __forceinline__ bool mixes_itself(const Layout& L, int64_t a) {
  return L.anchor_neg || L.csize[a] == 1;
}

template <typename T>
__device__ __forceinline__ T warp_total(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Forward of the chunk's rows [r0, r0 + R) (S is R × B): out[a] = anchor a's folded state.
template <class Loss, typename T>
__global__ void mix_fold_kernel(const T* __restrict__ S, int64_t R, int64_t B, int64_t r0,
                                Layout L, MixGeom<T> geo, Loss loss,
                                typename Loss::State* __restrict__ out) {
  using State = typename Loss::State;
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;  // the whole warp: i is the warp's
  const int64_t a = r0 + i, la = L.labels[a], c0 = L.cstart[a], K = L.csize[a];
  const bool own = mixes_itself(L, a);
  const T* Sa = S + i * B;
  const T lam = geo.lam, mu = T(1) - geo.lam;
  State st = State::empty();
  bool clamped;
  for (int64_t n = lane; n < B; n += 32) {
    if (L.labels[n] == la) continue;  // negatives only (the self pair included)
    const T s_an = Sa[n];
    if (own) {
      loss.push(st, geo.inv_norm(s_an, &clamped) * (lam + mu * s_an));
      continue;
    }
    for (int64_t j = c0; j < c0 + K; ++j) {
      if (j == a) continue;
      const T r = geo.inv_norm(S[(j - r0) * B + n], &clamped);
      loss.push(st, r * (lam * Sa[j] + mu * s_an));
    }
  }
  for (int off = 16; off > 0; off >>= 1) {  // every lane shuffles (full mask)
    const State other = cuda_pairs::shfl_down_state(st, off);
    if (lane < off) st.merge(other);
  }
  if (lane == 0) out[a] = st;
}

// Backward, the anchors' entries: G[a, n] (negatives) and G[a, j] (its positives)
template <class Loss, typename T>
__global__ void mix_grad_anchor_kernel(const T* __restrict__ S, T* __restrict__ G, int64_t R,
                                       int64_t B, int64_t r0, Layout L, MixGeom<T> geo,
                                       Loss loss) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;
  const int64_t a = r0 + i, la = L.labels[a], c0 = L.cstart[a], K = L.csize[a];
  if (!loss.live(a)) return;  // G stays 0
  const T* Sa = S + i * B;
  T* Ga = G + i * B;
  const T lam = geo.lam, mu = T(1) - geo.lam;
  bool clamped;
  if (mixes_itself(L, a)) {  // s̃ = r(s_an)(λ + (1−λ) s_an): both terms land on G[a, n]
    for (int64_t n = lane; n < B; n += 32) {
      if (L.labels[n] == la) continue;
      const T s_an = Sa[n];
      const T r = geo.inv_norm(s_an, &clamped);
      const T v = r * (lam + mu * s_an);
      const T dv = mu * r - (clamped ? T(0) : v * lam * mu * r * r);
      Ga[n] += loss.weight(v, a) * dv;
    }
    return;
  }
  for (int64_t j = c0; j < c0 + K; ++j) {
    if (j == a) continue;
    const T s_aj = Sa[j];
    const T* Sj = S + (j - r0) * B;
    T acc = T(0);  // Σ over this lane's negatives of w λ r_jn
    for (int64_t n = lane; n < B; n += 32) {
      if (L.labels[n] == la) continue;
      const T r = geo.inv_norm(Sj[n], &clamped);
      const T w = loss.weight(r * (lam * s_aj + mu * Sa[n]), a);
      Ga[n] += w * mu * r;
      acc += w * lam * r;
    }
    acc = warp_total(acc);
    if (lane == 0) Ga[j] += acc;
  }
}

// Backward, the positives' entries: G[j, n] over the anchors a of j's class (a ≠ j)
template <class Loss, typename T>
__global__ void mix_grad_positive_kernel(const T* __restrict__ S, T* __restrict__ G, int64_t R,
                                         int64_t B, int64_t r0, Layout L, MixGeom<T> geo,
                                         Loss loss) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;
  const int64_t j = r0 + i, lj = L.labels[j], c0 = L.cstart[j], K = L.csize[j];
  if (L.anchor_neg || K == 1) return;  // no anchor mixes j (an own-mixing class has one row)
  const T* Sj = S + i * B;
  T* Gj = G + i * B;
  const T lam = geo.lam, mu = T(1) - geo.lam;
  bool clamped;
  for (int64_t n = lane; n < B; n += 32) {
    if (L.labels[n] == lj) continue;
    const T r = geo.inv_norm(Sj[n], &clamped);
    if (clamped) continue;  // ∂s̃/∂s_jn = 0
    T acc = T(0);
    for (int64_t a = c0; a < c0 + K; ++a) {
      if (a == j || !loss.live(a)) continue;
      const T* Sa = S + (a - r0) * B;
      const T v = r * (lam * Sa[j] + mu * Sa[n]);
      acc += loss.weight(v, a) * (-v * lam * mu * r * r);
    }
    Gj[n] += acc;
  }
}

// The ops' common checks: unit rows x (fp32/fp64, CUDA), the sorted labels and each row's
// class start and size (int64, x's device), λ in [0, 1], chunk > 0
inline void check_mix_call(const at::Tensor& x, const at::Tensor& labels,
                           const at::Tensor& cstart, const at::Tensor& csize, double lam,
                           int64_t chunk) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (B, D), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64 (half inputs are upcast before the op), got ",
              x.scalar_type());
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  const int64_t B = x.size(0);
  const at::Tensor* vecs[] = {&labels, &cstart, &csize};
  const char* names[] = {"labels", "class_start", "class_size"};
  for (int k = 0; k < 3; ++k) {
    const at::Tensor& t = *vecs[k];
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == at::kLong, names[k],
                " must be int64 of shape (", B, ",)");
    TORCH_CHECK(t.device() == x.device(), names[k], " must be on ", x.device(), ", got ",
                t.device());
  }
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
}

// Chunks of whole classes of the sorted batch, about `chunk` rows each (a class larger than
// that is a chunk of its own): their first rows, with B appended
inline std::vector<int64_t> class_chunks(const at::Tensor& cstart, const at::Tensor& csize,
                                         int64_t chunk) {
  const at::Tensor st = cstart.cpu(), sz = csize.cpu();
  const int64_t *s = st.data_ptr<int64_t>(), *k = sz.data_ptr<int64_t>();
  const int64_t B = st.size(0);
  std::vector<int64_t> out{0};
  for (int64_t r = 0; r < B;) {
    TORCH_CHECK(s[r] == r && k[r] > 0 && r + k[r] <= B,
                "class_start/class_size must describe the classes of a label-sorted batch");
    const int64_t end = r + k[r];
    for (int64_t q = r + 1; q < end; ++q)  // every row of the class: the kernels trust them
      TORCH_CHECK(s[q] == r && k[q] == k[r],
                  "class_start/class_size must describe the classes of a label-sorted batch");
    if (end - out.back() > chunk && r > out.back()) out.push_back(r);
    r = end;
  }
  out.push_back(B);
  return out;
}

// One call's contiguous inputs and its chunks
struct MixCall {
  at::Tensor x, labels, cstart, csize;
  std::vector<int64_t> rows;
  Layout layout(bool anchor_neg) const {
    return {labels.data_ptr<int64_t>(), cstart.data_ptr<int64_t>(), csize.data_ptr<int64_t>(),
            anchor_neg};
  }
};

// (after check_mix_call, under the device guard)
inline MixCall mix_call(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& cstart,
                        const at::Tensor& csize, int64_t chunk) {
  MixCall c{x.contiguous(), labels.contiguous(), cstart.contiguous(), csize.contiguous(), {}};
  if (x.size(0) > 0) c.rows = class_chunks(c.cstart, c.csize, chunk);
  return c;
}

// Forward: every anchor's folded state into out (B states in device memory)
template <class Loss, typename T>
void fold_all_mix(const MixCall& c, bool anchor_neg, T lam, const Loss& loss,
                  typename Loss::State* out) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = c.x.size(0);
  for (size_t t = 0; t + 1 < c.rows.size(); ++t) {
    const int64_t r0 = c.rows[t], R = c.rows[t + 1] - r0;
    const at::Tensor S = at::mm(c.x.narrow(0, r0, R), c.x.t()).contiguous();
    mix_fold_kernel<Loss, T><<<(unsigned)((R + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        S.data_ptr<T>(), R, B, r0, c.layout(anchor_neg), MixGeom<T>{lam}, loss, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Backward: dx of the loss whose candidate weights `loss` gives
template <class Loss, typename T>
at::Tensor grad_all_mix(const MixCall& c, bool anchor_neg, T lam, const Loss& loss) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = c.x.size(0);
  at::Tensor dx = at::zeros_like(c.x);
  for (size_t t = 0; t + 1 < c.rows.size(); ++t) {
    const int64_t r0 = c.rows[t], R = c.rows[t + 1] - r0;
    const at::Tensor xr = c.x.narrow(0, r0, R);
    const at::Tensor S = at::mm(xr, c.x.t()).contiguous();
    at::Tensor G = at::zeros_like(S);
    const unsigned blocks = (unsigned)((R + kWarps - 1) / kWarps);
    mix_grad_anchor_kernel<Loss, T><<<blocks, kThreads, 0, stream>>>(
        S.data_ptr<T>(), G.data_ptr<T>(), R, B, r0, c.layout(anchor_neg), MixGeom<T>{lam}, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mix_grad_positive_kernel<Loss, T><<<blocks, kThreads, 0, stream>>>(
        S.data_ptr<T>(), G.data_ptr<T>(), R, B, r0, c.layout(anchor_neg), MixGeom<T>{lam}, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dx.narrow(0, r0, R).addmm_(G, c.x);
    dx.addmm_(G.t(), xr);
  }
  return dx;
}

}  // namespace cuda_metrix
}  // namespace metrix_ops
