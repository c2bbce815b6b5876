// Embedding-level Metrix for MultiSimilarityLoss on the CUDA engine (pairs "pos_neg" or
// "anchor_neg", the batch against itself): per anchor a its mixed term
//
//     ℓ̃(a) = (1/α) log(1 + λ Σ_V e^{−α(s̃−base)}) + (1/β) log(1 + (1−λ) Σ_V e^{β(s̃−base)}),
//
// over the closed-form candidates V(a) = { mix(x_j, x_n, λ) : j ∈ P(a), n ∈ N(a) } (j = a
// itself under "anchor_neg" or when a has no positive), s̃ = r_jn (λ s_aj + (1−λ) s_an) with
// r_jn = 1/‖λ x_j + (1−λ) x_n‖ from s_jn (common/metrix_mix.h). No mixed point is
// materialised and no B×B matrix is held: the batch is label-sorted (the caller sorts), and
// per chunk of whole classes (about `chunk` rows) one cuBLAS product S_rows = X_rows Xᵀ holds
// every Gram entry its anchors' candidates need (an anchor's positives are rows of its own
// class). Each side is an online log-sum-exp started from the term 1/y (y = λ or 1 − λ), so
// it ends as log(1/y + Σ e^·), the normaliser the gradient divides by; ℓ̃'s side is
// (that + log y)/k, and a side with y = 0 contributes nothing.
//
// Forward: a warp per anchor, lanes over strided columns (its negatives), each lane looping
// over the anchor's positives; the lanes' states merge by shuffles.
// Backward: the chunk is recomputed, and G = ∂L/∂S_rows (R × B) is built by two kernels,
// each recomputing the candidates with the weight w = g_a (e^{β(s̃−b) − lse⁻_a} −
// e^{−α(s̃−b) − lse⁺_a}) (per side times its flag):
//   anchors (a warp per row a): G[a, n] += w (1−λ) r_jn over j, and G[a, j] = Σ_n w λ r_jn
//     (a warp reduction per positive j);
//   positives (a warp per row j): G[j, n] += Σ_a w ∂s̃/∂s_jn, ∂s̃/∂s_jn = −s̃ λ(1−λ) r_jn²
//     (0 where ‖v‖ is clamped).
// Every entry has one writer per kernel (a warp owns its row): no atomics, deterministic. The
// candidates are recomputed rather than stored: there are (K−1)·B per anchor. Then
// dX_rows += G X and dX += Gᵀ X_rows (cuBLAS).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/metrix_mix.h"
#include "common/row_state.h"

namespace metrix_ops {

namespace {

constexpr int kWarps = 8;  // rows (one warp each) per block
constexpr int kThreads = 32 * kWarps;

// The loss's constants for one call: λ, MS's α, β, base, and per side (+, −) the start of the
// online log-sum-exp (log 1/y), log y and the side's flag (y > 0).
template <typename T>
struct MixConsts {
  T lam, alpha, beta, base;
  T start_p, start_n, logy_p, logy_n, flag_p, flag_n;

  // 1/‖λ x_j + (1−λ) x_n‖ from s_jn, ‖v‖ clamped below at kMixEps; *clamped when it is
  __device__ __forceinline__ T inv_norm(T s_jn, bool* clamped) const {
    const T q = lam * lam + (T(1) - lam) * (T(1) - lam) + T(2) * lam * (T(1) - lam) * s_jn;
    const T eps2 = T(kMixEps) * T(kMixEps);
    *clamped = !(q > eps2);
    return *clamped ? T(1) / T(kMixEps) : T(1) / std::sqrt(q);
  }
  // ∂L/∂s̃ of one candidate of an anchor with upstream g and saved lse⁺, lse⁻
  __device__ __forceinline__ T weight(T v, T g, T lp, T ln) const {
    const T xp = -alpha * (v - base), xn = beta * (v - base);
    return g * (flag_n * std::exp(xn - ln) - flag_p * std::exp(xp - lp));
  }
};

template <typename T>
MixConsts<T> mix_consts(double lam, double alpha, double beta, double base) {
  auto side = [](double y, T* start, T* logy, T* flag) {
    *start = y > 0 ? T(-std::log(y)) : T(0);
    *logy = y > 0 ? T(std::log(y)) : T(0);
    *flag = y > 0 ? T(1) : T(0);
  };
  MixConsts<T> c{T(lam), T(alpha), T(beta), T(base)};
  side(lam, &c.start_p, &c.logy_p, &c.flag_p);
  side(1.0 - lam, &c.start_n, &c.logy_n, &c.flag_n);
  return c;
}

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
__device__ __forceinline__ OnlineLse<T> warp_merge(OnlineLse<T> v) {
  for (int off = 16; off > 0; off >>= 1) {
    OnlineLse<T> o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, off);
    v.merge(o);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_total(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Forward of the chunk's rows [r0, r0 + R): S is R × B.
template <typename T>
__global__ void mix_fwd_kernel(const T* __restrict__ S, int64_t R, int64_t B, int64_t r0,
                               Layout L, MixConsts<T> c, T* __restrict__ mix,
                               T* __restrict__ lp, T* __restrict__ ln) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;  // the whole warp: i is the warp's
  const int64_t a = r0 + i, la = L.labels[a], c0 = L.cstart[a], K = L.csize[a];
  const bool own = mixes_itself(L, a);
  const T* Sa = S + i * B;
  OnlineLse<T> P = OnlineLse<T>::empty(), N = OnlineLse<T>::empty();
  bool clamped;
  for (int64_t n = lane; n < B; n += 32) {
    if (L.labels[n] == la) continue;  // negatives only (the self pair included)
    const T s_an = Sa[n];
    if (own) {
      const T v = c.inv_norm(s_an, &clamped) * (c.lam + (T(1) - c.lam) * s_an);
      P.push(-c.alpha * (v - c.base));
      N.push(c.beta * (v - c.base));
      continue;
    }
    for (int64_t j = c0; j < c0 + K; ++j) {
      if (j == a) continue;
      const T s_jn = S[(j - r0) * B + n];
      const T v = c.inv_norm(s_jn, &clamped) * (c.lam * Sa[j] + (T(1) - c.lam) * s_an);
      P.push(-c.alpha * (v - c.base));
      N.push(c.beta * (v - c.base));
    }
  }
  P = warp_merge(P);
  N = warp_merge(N);
  if (lane == 0) {
    OnlineLse<T> p{c.start_p, T(1)}, q{c.start_n, T(1)};  // the 1/y terms
    p.merge(P);
    q.merge(N);
    lp[a] = p.value();
    ln[a] = q.value();
    mix[a] = c.flag_p * (lp[a] + c.logy_p) / c.alpha + c.flag_n * (ln[a] + c.logy_n) / c.beta;
  }
}

// Backward, the anchors' entries: G[a, n] (negatives) and G[a, j] (its positives)
template <typename T>
__global__ void mix_grad_anchor_kernel(const T* __restrict__ S, T* __restrict__ G, int64_t R,
                                       int64_t B, int64_t r0, Layout L, MixConsts<T> c,
                                       const T* __restrict__ g, const T* __restrict__ lp,
                                       const T* __restrict__ ln) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;
  const int64_t a = r0 + i, la = L.labels[a], c0 = L.cstart[a], K = L.csize[a];
  const T ga = g[a], lpa = lp[a], lna = ln[a];
  if (ga == T(0)) return;  // G stays 0
  const T* Sa = S + i * B;
  T* Ga = G + i * B;
  const T lam = c.lam, mu = T(1) - c.lam;
  bool clamped;
  if (mixes_itself(L, a)) {  // s̃ = r(s_an)(λ + (1−λ) s_an): both terms land on G[a, n]
    for (int64_t n = lane; n < B; n += 32) {
      if (L.labels[n] == la) continue;
      const T s_an = Sa[n];
      const T r = c.inv_norm(s_an, &clamped);
      const T v = r * (lam + mu * s_an);
      const T dv = mu * r - (clamped ? T(0) : v * lam * mu * r * r);
      Ga[n] += c.weight(v, ga, lpa, lna) * dv;
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
      const T s_an = Sa[n];
      const T r = c.inv_norm(Sj[n], &clamped);
      const T w = c.weight(r * (lam * s_aj + mu * s_an), ga, lpa, lna);
      Ga[n] += w * mu * r;
      acc += w * lam * r;
    }
    acc = warp_total(acc);
    if (lane == 0) Ga[j] += acc;
  }
}

// Backward, the positives' entries: G[j, n] over the anchors a of j's class (a ≠ j)
template <typename T>
__global__ void mix_grad_positive_kernel(const T* __restrict__ S, T* __restrict__ G, int64_t R,
                                         int64_t B, int64_t r0, Layout L, MixConsts<T> c,
                                         const T* __restrict__ g, const T* __restrict__ lp,
                                         const T* __restrict__ ln) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= R) return;
  const int64_t j = r0 + i, lj = L.labels[j], c0 = L.cstart[j], K = L.csize[j];
  if (L.anchor_neg || K == 1) return;  // no anchor mixes j (an own-mixing class has one row)
  const T* Sj = S + i * B;
  T* Gj = G + i * B;
  const T lam = c.lam, mu = T(1) - c.lam;
  bool clamped;
  for (int64_t n = lane; n < B; n += 32) {
    if (L.labels[n] == lj) continue;
    const T r = c.inv_norm(Sj[n], &clamped);
    if (clamped) continue;  // ∂s̃/∂s_jn = 0
    T acc = T(0);
    for (int64_t a = c0; a < c0 + K; ++a) {
      if (a == j || g[a] == T(0)) continue;
      const T* Sa = S + (a - r0) * B;
      const T v = r * (lam * Sa[j] + mu * Sa[n]);
      acc += c.weight(v, g[a], lp[a], ln[a]) * (-v * lam * mu * r * r);
    }
    Gj[n] += acc;
  }
}

void check_mix_call(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& cstart,
                    const at::Tensor& csize, double lam, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (B, D), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64 (half inputs are upcast before the op), got ",
              x.scalar_type());
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  const int64_t B = x.size(0);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{labels, "labels"},
                                {cstart, "class_start"}, {csize, "class_size"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == at::kLong, name,
                " must be int64 of shape (", B, ",)");
    TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  }
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
}

// Chunks of whole classes of the sorted batch, about `chunk` rows each (a class larger than
// that is a chunk of its own): their first rows, with B appended
std::vector<int64_t> class_chunks(const at::Tensor& cstart, const at::Tensor& csize,
                                  int64_t chunk) {
  const at::Tensor st = cstart.cpu(), sz = csize.cpu();
  const int64_t *s = st.data_ptr<int64_t>(), *k = sz.data_ptr<int64_t>();
  const int64_t B = st.size(0);
  std::vector<int64_t> out{0};
  for (int64_t r = 0; r < B;) {
    TORCH_CHECK(s[r] == r && k[r] > 0 && r + k[r] <= B,
                "class_start/class_size must describe the classes of a label-sorted batch");
    const int64_t end = r + k[r];
    if (end - out.back() > chunk && r > out.back()) out.push_back(r);
    r = end;
  }
  out.push_back(B);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_metrix_mix_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& labels_, const at::Tensor& cstart_,
    const at::Tensor& csize_, double alpha, double beta, double base, double lam,
    bool anchor_neg, int64_t chunk) {
  check_mix_call(x_, labels_, cstart_, csize_, lam, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), labels = labels_.contiguous();
  auto cstart = cstart_.contiguous(), csize = csize_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor mix = at::zeros({B}, x.options()), lp = at::zeros_like(mix), ln = at::zeros_like(mix);
  if (B == 0) return {mix, lp, ln};
  const std::vector<int64_t> rows = class_chunks(cstart, csize, chunk);
  const Layout L{labels.data_ptr<int64_t>(), cstart.data_ptr<int64_t>(),
                 csize.data_ptr<int64_t>(), anchor_neg};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_mix_fwd_cuda", [&] {
    using T = scalar_t;
    const MixConsts<T> c = mix_consts<T>(lam, alpha, beta, base);
    for (size_t t = 0; t + 1 < rows.size(); ++t) {
      const int64_t r0 = rows[t], R = rows[t + 1] - r0;
      const at::Tensor S = at::mm(x.narrow(0, r0, R), x.t()).contiguous();
      mix_fwd_kernel<T><<<(unsigned)((R + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
          S.data_ptr<T>(), R, B, r0, L, c, mix.data_ptr<T>(), lp.data_ptr<T>(),
          ln.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {mix, lp, ln};
}

at::Tensor ms_metrix_mix_bwd_cuda(const at::Tensor& grad, const at::Tensor& x_,
                                  const at::Tensor& labels_, const at::Tensor& cstart_,
                                  const at::Tensor& csize_, const at::Tensor& lse_pos,
                                  const at::Tensor& lse_neg, double alpha, double beta,
                                  double base, double lam, bool anchor_neg, int64_t chunk) {
  check_mix_call(x_, labels_, cstart_, csize_, lam, chunk);
  check_row_vec(grad, x_, "grad");
  check_row_vec(lse_pos, x_, "lse_pos");
  check_row_vec(lse_neg, x_, "lse_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), labels = labels_.contiguous();
  auto cstart = cstart_.contiguous(), csize = csize_.contiguous();
  auto g = grad.to(x.scalar_type()).contiguous();
  auto lp = lse_pos.to(x.scalar_type()).contiguous(), ln = lse_neg.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0);
  at::Tensor dx = at::zeros_like(x);
  if (B == 0) return dx;
  const std::vector<int64_t> rows = class_chunks(cstart, csize, chunk);
  const Layout L{labels.data_ptr<int64_t>(), cstart.data_ptr<int64_t>(),
                 csize.data_ptr<int64_t>(), anchor_neg};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_mix_bwd_cuda", [&] {
    using T = scalar_t;
    const MixConsts<T> c = mix_consts<T>(lam, alpha, beta, base);
    for (size_t t = 0; t + 1 < rows.size(); ++t) {
      const int64_t r0 = rows[t], R = rows[t + 1] - r0;
      const at::Tensor xr = x.narrow(0, r0, R);
      const at::Tensor S = at::mm(xr, x.t()).contiguous();
      at::Tensor G = at::zeros_like(S);
      const unsigned blocks = (unsigned)((R + kWarps - 1) / kWarps);
      mix_grad_anchor_kernel<T><<<blocks, kThreads, 0, stream>>>(
          S.data_ptr<T>(), G.data_ptr<T>(), R, B, r0, L, c, g.data_ptr<T>(), lp.data_ptr<T>(),
          ln.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mix_grad_positive_kernel<T><<<blocks, kThreads, 0, stream>>>(
          S.data_ptr<T>(), G.data_ptr<T>(), R, B, r0, L, c, g.data_ptr<T>(), lp.data_ptr<T>(),
          ln.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dx.narrow(0, r0, R).addmm_(G, x);
      dx.addmm_(G.t(), xr);
    }
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // MultiSimilarityLoss's embedding-level Metrix term on CUDA tensors: unit rows x sorted by
  // label, each row's class start and size; per anchor (ℓ̃, lse⁺, lse⁻), 0 where V(a) is
  // empty. Row chunks of whole classes, about `chunk` rows each.
  m.def("ms_metrix_mix_fwd(Tensor x, Tensor labels, Tensor class_start, Tensor class_size, "
        "float alpha, float beta, float base, float lam, bool anchor_neg, int chunk) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ms_metrix_mix_bwd(Tensor grad, Tensor x, Tensor labels, Tensor class_start, "
        "Tensor class_size, Tensor lse_pos, Tensor lse_neg, float alpha, float beta, "
        "float base, float lam, bool anchor_neg, int chunk) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("ms_metrix_mix_fwd", &ms_metrix_mix_fwd_cuda);
  m.impl("ms_metrix_mix_bwd", &ms_metrix_mix_bwd_cuda);
}

}  // namespace metrix_ops
