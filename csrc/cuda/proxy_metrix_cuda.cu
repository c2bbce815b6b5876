// CUDA implementations of the embedding-level Metrix ops of the proxy losses (the schemas of
// csrc/cpu/proxy_anchor_metrix_cpu.cpp and proxy_nca_metrix_cpu.cpp, so the glue
// fused/proxy_metrix.py serves both devices). The candidates are the mixes v = mix(x_u, x_w, λ)
// of the ordered batch pairs u ≠ w of different labels (same label for pos_pos), each
// candidate's cosine to a proxy in closed form (common/proxy_metrix.h):
//   s(v̂, p_c) = (λ·S[c,u] + (1−λ)·S[c,w]) · r_uw,   r_uw = 1/‖v‖ from the Gram entry G[u,w].
//
// Layout: S = P̂ X̂ᵀ (C×B, so a proxy's cosines to the batch are one contiguous row) and one
// block of Gram rows G[a0:a1, :] at a time (cuBLAS); nothing of size B² or B²·C is held.
// Every kernel has one writer per output entry (no atomics, deterministic):
//   ProxyAnchor forward:  a warp per (row u, proxy c) folds u's candidates (u, ·) into the
//                         two log-sum-exps of c, written to a B×C table; the merge over u is
//                         one logsumexp per proxy (PyTorch).
//   ProxyAnchor backward: a warp per (u, c) for ∂L/∂S[c,u], then a thread per (u, w) for
//                         H[u,w] = ∂L/∂G[u,w] + ∂L/∂G[w,u] over the proxies; row u handles both
//                         orders (u, w) and (w, u), as the CPU op, so it owns both outputs.
//   ProxyNCA forward:     a thread per candidate (u, w), its softmax over the C proxies by an
//                         online log-sum-exp; the row sums by a fixed block reduction.
//   ProxyNCA backward:    a thread per (u, w) for the two orders' log-sum-exps, a warp per
//                         (u, c) for ∂L/∂S[c,u], a thread per (u, w) for H[u,w].
// Then dX += H X per block, dX += (∂L/∂S)ᵀ P and dP = (∂L/∂S) X (cuBLAS).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "common/proxy_metrix.h"
#include "cuda/pair_rows.cuh"  // TwoSideLse, shfl_down_state

namespace metrix_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;
constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// e^{arg − lse}, 0 for an absent term (arg = −inf: a class mass of 0) without an exp
template <typename T>
__device__ __forceinline__ T term_exp(T arg, T lse) {
  return arg == -T(kInf) ? T(0) : std::exp(arg - lse);
}

// What every kernel of one call shares: the mix, the batch's cosines to the proxies and the
// current block of Gram rows
template <typename T>
struct PairMix {
  const T* st;       // S = P̂ X̂ᵀ, C×B
  const T* g;        // Gram rows [a0, a0 + rows) × B
  const int32_t* y;  // labels
  int64_t B, C, a0, rows;
  T lam, om, c0, c1;
  bool same;         // pos_pos: pairs of the same label, else of different labels

  __device__ __forceinline__ bool partner(int64_t a, int32_t ya, int64_t w) const {
    return w != a && (same ? y[w] == ya : y[w] != ya);
  }
  __device__ __forceinline__ T inv_norm(int64_t i, int64_t w) const {
    return mix_inv_norm(c0, c1, g[i * B + w]);
  }
  // the block of Gram rows [first, first + n) the next kernels read
  void at_block(int64_t first, int64_t n, const at::Tensor& gram) {
    g = gram.data_ptr<T>();
    a0 = first;
    rows = n;
  }
};

template <typename T>
PairMix<T> make_mix(const at::Tensor& st, const at::Tensor& y32, int64_t B, int64_t C,
                    double lam, bool same) {
  return PairMix<T>{st.data_ptr<T>(), nullptr, y32.data_ptr<int32_t>(), B, C, 0, 0, T(lam),
                    T(1.0 - lam), T(lam * lam + (1.0 - lam) * (1.0 - lam)),
                    T(2.0 * lam * (1.0 - lam)), same};
}

// ---- ProxyAnchor

// The log-weights of a candidate's class masses on proxy c, by whether the row u is of class
// c (is_u) and whether its partner w is (own): the order (u, w) has mass λ[is_u] + (1−λ)[own],
// the order (w, u) (1−λ)[is_u] + λ[own]. Computed on the host in T as the CPU op computes
// them (log_weight of the same sums), so a mass of 1 − 1 is exactly what the CPU sees.
template <typename T>
struct PaWeights {
  T pos[2][2][2];  // [is_u][own][order]: log y
  T neg[2][2][2];  // log(1 − y)
};

// v[is_u][own][O] by selects, not a runtime index (which would copy the kernel's parameter
// struct to local memory)
template <int O, typename T>
__device__ __forceinline__ T lw_at(const T (&v)[2][2][2], bool is_u, bool own) {
  return is_u ? (own ? v[1][1][O] : v[1][0][O]) : (own ? v[0][1][O] : v[0][0][O]);
}

template <typename T>
PaWeights<T> pa_weights(T lam, T om) {
  PaWeights<T> w;
  for (int is_u = 0; is_u < 2; ++is_u)
    for (int own = 0; own < 2; ++own) {
      const T m1 = (is_u ? lam : T(0)), m2 = (is_u ? om : T(0));
      const T y1 = own ? m1 + om : m1, y2 = own ? lam + m2 : m2;  // the CPU's u0/u1, v0/v1
      w.pos[is_u][own][0] = log_weight(y1);
      w.pos[is_u][own][1] = log_weight(y2);
      w.neg[is_u][own][0] = log_weight(T(1) - y1);
      w.neg[is_u][own][1] = log_weight(T(1) - y2);
    }
  return w;
}

template <typename T>
struct PaArgs {
  PairMix<T> m;
  PaWeights<T> lw;
  T alpha, margin;
  // backward: the proxies' upstream gradients and finished terms
  const T* gp;
  const T* gn;
  const T* lp;
  const T* ln;

  // ∂L/∂s̃ of the candidates (a, w) and (w, a) on proxy c (s1, s2 their cosines):
  // −α·gp·e^{pos arg − pos_c} + α·gn·e^{neg arg − neg_c}, class masses as log-weights
  __device__ __forceinline__ void grads(int64_t, int64_t, int64_t, int64_t c, int32_t ya,
                                        int32_t yw, T s1, T s2, T& g1, T& g2) const {
    const bool is_u = int32_t(c) == ya, own = int32_t(c) == yw;
    const T cp = -alpha * gp[c], cn = alpha * gn[c], lpc = lp[c], lnc = ln[c];
    g1 = cp * term_exp(pa_pos_arg(s1, alpha, margin) + lw_at<0>(lw.pos, is_u, own), lpc) +
         cn * term_exp(pa_neg_arg(s1, alpha, margin) + lw_at<0>(lw.neg, is_u, own), lnc);
    g2 = cp * term_exp(pa_pos_arg(s2, alpha, margin) + lw_at<1>(lw.pos, is_u, own), lpc) +
         cn * term_exp(pa_neg_arg(s2, alpha, margin) + lw_at<1>(lw.neg, is_u, own), lnc);
  }
};

// Forward: warp (i, c) folds row a = a0 + i's candidates into proxy c's two log-sum-exps
template <typename T>
__global__ void pa_fold_kernel(PaArgs<T> k, T* __restrict__ rows_p, T* __restrict__ rows_n) {
  const auto& m = k.m;
  const int64_t gw = ((int64_t)blockIdx.x * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (gw >= m.rows * m.C) return;  // the whole warp: gw is the warp's
  const int64_t i = gw / m.C, c = gw % m.C, a = m.a0 + i;
  const int32_t ya = m.y[a];
  const bool is_u = int32_t(c) == ya;
  const T* sc = m.st + c * m.B;
  const T sa = sc[a];
  cuda_pairs::TwoSideLse<T> st = cuda_pairs::TwoSideLse<T>::empty();
  for (int64_t w = lane; w < m.B; w += 32) {
    if (!m.partner(a, ya, w)) continue;
    const T s = mix_cos(m.lam, m.om, sa, sc[w], m.inv_norm(i, w));
    const bool own = m.y[w] == int32_t(c);
    st.pos.push(pa_pos_arg(s, k.alpha, k.margin) + lw_at<0>(k.lw.pos, is_u, own));
    st.neg.push(pa_neg_arg(s, k.alpha, k.margin) + lw_at<0>(k.lw.neg, is_u, own));
  }
  for (int off = 16; off > 0; off >>= 1) {  // every lane shuffles (full mask)
    const auto other = cuda_pairs::shfl_down_state(st, off);
    if (lane < off) st.merge(other);
  }
  if (lane == 0) {
    rows_p[a * m.C + c] = st.pos.value();
    rows_n[a * m.C + c] = st.neg.value();
  }
}

// ---- ProxyNCA

template <typename T>
struct NcaArgs {
  PairMix<T> m;
  T scale;
  bool cosine;       // logit = scale·s, else −scale·(2 − 2s) (squared L2)
  const T* q;        // backward: the upstream gradient of each row's sum
  T* lse1;           // backward: per block entry, the log-sum-exp of (u, w) and of (w, u)
  T* lse2;

  __device__ __forceinline__ T logit(T s) const { return pm_nca_logit(s, scale, cosine); }

  // ∂L/∂s̃ on proxy c of the candidates (a, w) (in row a's sum) and (w, a) (in row w's):
  // q·(Y·softmax_c − y_c)·dlogit/ds, Y = λ + (1−λ) the total mass; i: a's row of the block
  __device__ __forceinline__ void grads(int64_t i, int64_t a, int64_t w, int64_t c, int32_t ya,
                                        int32_t yw, T s1, T s2, T& t1, T& t2) const;
};

// Log-sum-exp over the proxies of the logits of the candidate whose first member is u
// (cosines sa to the proxies, λ on it) and second w
template <typename T>
__device__ __forceinline__ T nca_lse(const NcaArgs<T>& k, int64_t u, int64_t w, T r) {
  const auto& m = k.m;
  OnlineLse<T> acc = OnlineLse<T>::empty();
  for (int64_t c = 0; c < m.C; ++c)
    acc.push(k.logit(mix_cos(m.lam, m.om, m.st[c * m.B + u], m.st[c * m.B + w], r)));
  return acc.value();
}

// The target mass of proxy c for the candidate (first, second) with labels yf, ys: λ on the
// first's class, 1−λ on the second's
template <typename T>
__device__ __forceinline__ T nca_target(const PairMix<T>& m, int64_t c, int32_t yf, int32_t ys) {
  return (int32_t(c) == yf ? m.lam : T(0)) + (int32_t(c) == ys ? m.om : T(0));
}

// Forward: thread (i, w), candidate (a, w)'s cross-entropy −Σ_c y_c (logit_c − lse); block
// totals per row of the Gram block into part[i, blockIdx.x]
template <typename T>
__global__ void nca_fwd_kernel(NcaArgs<T> k, T* __restrict__ part, int64_t n_part) {
  const auto& m = k.m;
  const int64_t i = blockIdx.y, w = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const int64_t a = m.a0 + i;
  const int32_t ya = m.y[a];
  T v = 0;
  if (w < m.B && m.partner(a, ya, w)) {
    const T r = m.inv_norm(i, w), lse = nca_lse(k, a, w, r);
    const int32_t yw = m.y[w];
    auto logit_of = [&](int32_t c) {
      return k.logit(mix_cos(m.lam, m.om, m.st[c * m.B + a], m.st[c * m.B + w], r));
    };
    v = -(m.lam * (logit_of(ya) - lse) + m.om * (logit_of(yw) - lse));
  }
  __shared__ T warp_part[kWarps];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T t = 0;
    for (int j = 0; j < kWarps; ++j) t += warp_part[j];  // fixed order
    part[i * n_part + blockIdx.x] = t;
  }
}

// Backward: thread (i, w), the log-sum-exps of (a, w) and (w, a) into lse1, lse2
template <typename T>
__global__ void nca_lse_kernel(NcaArgs<T> k) {
  const auto& m = k.m;
  const int64_t i = blockIdx.y, w = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (w >= m.B) return;
  const int64_t a = m.a0 + i;
  if (!m.partner(a, m.y[a], w)) return;  // never read
  const T r = m.inv_norm(i, w);
  k.lse1[i * m.B + w] = nca_lse(k, a, w, r);
  k.lse2[i * m.B + w] = nca_lse(k, w, a, r);
}

template <typename T>
__device__ __forceinline__ void NcaArgs<T>::grads(int64_t i, int64_t a, int64_t w, int64_t c,
                                                  int32_t ya, int32_t yw, T s1, T s2, T& t1,
                                                  T& t2) const {
  const int64_t e = i * m.B + w;
  const T mass = m.lam + m.om;
  const T p1 = std::exp(logit(s1) - lse1[e]), p2 = std::exp(logit(s2) - lse2[e]);
  t1 = q[a] * (mass * p1 - nca_target(m, c, ya, yw)) * pm_nca_dlogit(s1, scale, cosine);
  t2 = q[w] * (mass * p2 - nca_target(m, c, yw, ya)) * pm_nca_dlogit(s2, scale, cosine);
}

// ---- the backward kernels of both losses; Args: PaArgs or NcaArgs (their grads())

// Warp (i, c) writes ∂L/∂S[c, a] (stored as dsp[a, c]) over both orders of a's pairs
template <class Args, typename T>
__global__ void dsp_kernel(Args k, T* __restrict__ dsp) {
  const auto& m = k.m;
  const int64_t gw = ((int64_t)blockIdx.x * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (gw >= m.rows * m.C) return;  // the whole warp
  const int64_t i = gw / m.C, c = gw % m.C, a = m.a0 + i;
  const int32_t ya = m.y[a];
  const T* sc = m.st + c * m.B;
  const T sa = sc[a];
  T acc = 0;
  for (int64_t w = lane; w < m.B; w += 32) {
    if (!m.partner(a, ya, w)) continue;
    const T r = m.inv_norm(i, w), sw = sc[w];
    T g1, g2;
    k.grads(i, a, w, c, ya, m.y[w], mix_cos(m.lam, m.om, sa, sw, r),
            mix_cos(m.lam, m.om, sw, sa, r), g1, g2);
    acc += r * (m.lam * g1 + m.om * g2);
  }
  acc = warp_sum(acc);
  if (lane == 0) dsp[a * m.C + c] = acc;
}

// Thread (i, w) turns its Gram entry into H[a, w] = ∂L/∂G[a,w] + ∂L/∂G[w,a] (through ‖v‖, both
// orders); runs after dsp_kernel has read the block. h aliases k.m.g: no __restrict__.
template <class Args, typename T>
__global__ void gram_grad_kernel(Args k, T* h) {
  const auto& m = k.m;
  const int64_t i = blockIdx.y, w = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (w >= m.B) return;
  const int64_t a = m.a0 + i;
  const int32_t ya = m.y[a];
  if (!m.partner(a, ya, w)) {
    h[i * m.B + w] = T(0);
    return;
  }
  const T r = m.inv_norm(i, w);
  const int32_t yw = m.y[w];
  T acc = 0;
  for (int64_t c = 0; c < m.C; ++c) {
    const T sa = m.st[c * m.B + a], sw = m.st[c * m.B + w];
    const T s1 = mix_cos(m.lam, m.om, sa, sw, r), s2 = mix_cos(m.lam, m.om, sw, sa, r);
    T g1, g2;
    k.grads(i, a, w, c, ya, yw, s1, s2, g1, g2);
    acc += g1 * s1 + g2 * s2;
  }
  h[i * m.B + w] = mix_norm_coef(m.c1, r) * acc;  // after the read: one owner per entry
}

// ---- host side

void check_call(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                int64_t chunk, double lam) {
  check_proxy_op_inputs(x, p, labels, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31) && p.size(0) < (int64_t(1) << 31),
              "x and proxies must have fewer than 2^31 rows");
}

void check_nca_args(double scale, int64_t kind) {
  TORCH_CHECK(kind == kNcaCosine || kind == kNcaSquaredL2, "kind must be 0 or 1, got ", kind);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
}

// Rows per Gram block: `chunk`, within the launch limits (a grid's y extent; rows × C warps)
int64_t block_rows(int64_t chunk, int64_t C) {
  const int64_t by_warps = std::max<int64_t>(1, (int64_t(1) << 30) / std::max<int64_t>(C, 1));
  return std::max<int64_t>(1, std::min({chunk, kMaxGridY, by_warps}));
}

unsigned warp_blocks(int64_t rows, int64_t C) {
  return (unsigned)((rows * C + kWarps - 1) / kWarps);
}

dim3 entry_grid(int64_t B, int64_t rows) {
  return dim3((unsigned)((B + kThreads - 1) / kThreads), (unsigned)rows);
}

// Calls f(a0, rows, gram) for each block of Gram rows X[a0:a0+rows] Xᵀ
template <class F>
void for_gram_blocks(const at::Tensor& x, int64_t rows_per, F&& f) {
  const int64_t B = x.size(0);
  for (int64_t a0 = 0; a0 < B; a0 += rows_per) {
    const int64_t n = std::min(rows_per, B - a0);
    f(a0, n, at::mm(x.narrow(0, a0, n), x.t()).contiguous());
  }
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

std::tuple<at::Tensor, at::Tensor> proxy_anchor_metrix_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& p_, const at::Tensor& labels_, double alpha,
    double margin, double lam, bool same_label, int64_t chunk) {
  check_call(x_, p_, labels_, chunk, lam);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  const double ninf = -kInf;
  // rows without candidates add nothing (−inf); a proxy's terms start from log(1 + ·)
  at::Tensor rows_p = at::full({B, C}, ninf, x.options()), rows_n = at::full({B, C}, ninf, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_metrix_fwd_cuda", [&] {
    using T = scalar_t;
    const at::Tensor st = at::mm(p, x.t()).contiguous();
    PaArgs<T> k{make_mix<T>(st, y32, B, C, lam, same_label), pa_weights<T>(T(lam), T(1.0 - lam)),
                T(alpha), T(margin), nullptr, nullptr, nullptr, nullptr};
    if (C == 0) return;
    for_gram_blocks(x, block_rows(chunk, C), [&](int64_t a0, int64_t n, const at::Tensor& g) {
      k.m.at_block(a0, n, g);
      pa_fold_kernel<T><<<warp_blocks(n, C), kThreads, 0, stream()>>>(
          k, rows_p.data_ptr<T>(), rows_n.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // log(1 + Σ_u e^{lse_u}): an all −inf column gives log 1 = 0
  auto finish = [](const at::Tensor& r) {
    return at::logaddexp(at::logsumexp(r, {0}), at::zeros({1}, r.options()));
  };
  return {finish(rows_p), finish(rows_n)};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_metrix_bwd_cuda(
    const at::Tensor& grad_pos_, const at::Tensor& grad_neg_, const at::Tensor& x_,
    const at::Tensor& p_, const at::Tensor& labels_, const at::Tensor& pos_,
    const at::Tensor& neg_, double alpha, double margin, double lam, bool same_label,
    int64_t chunk) {
  check_call(x_, p_, labels_, chunk, lam);
  check_row_vec(grad_pos_, p_, "grad_pos");
  check_row_vec(grad_neg_, p_, "grad_neg");
  check_row_vec(pos_, p_, "pos");
  check_row_vec(neg_, p_, "neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  const auto dt = x.scalar_type();
  auto gp = grad_pos_.to(dt).contiguous(), gn = grad_neg_.to(dt).contiguous();
  auto lp = pos_.to(dt).contiguous(), ln = neg_.to(dt).contiguous();
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  at::Tensor dx = at::zeros_like(x), dsp = at::zeros({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "proxy_anchor_metrix_bwd_cuda", [&] {
    using T = scalar_t;
    const at::Tensor st = at::mm(p, x.t()).contiguous();
    PaArgs<T> k{make_mix<T>(st, y32, B, C, lam, same_label), pa_weights<T>(T(lam), T(1.0 - lam)),
                T(alpha), T(margin), gp.data_ptr<T>(), gn.data_ptr<T>(), lp.data_ptr<T>(),
                ln.data_ptr<T>()};
    if (C == 0) return;
    for_gram_blocks(x, block_rows(chunk, C), [&](int64_t a0, int64_t n, const at::Tensor& g) {
      k.m.at_block(a0, n, g);
      dsp_kernel<PaArgs<T>, T><<<warp_blocks(n, C), kThreads, 0, stream()>>>(k, dsp.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // the Gram block becomes H in place, read before written by each entry's one thread
      gram_grad_kernel<PaArgs<T>, T><<<entry_grid(B, n), kThreads, 0, stream()>>>(k, g.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dx.narrow(0, a0, n).addmm_(g, x);
    });
  });
  dx.addmm_(dsp, p);
  return {dx, at::mm(dsp.t(), x)};
}

at::Tensor proxy_nca_metrix_fwd_cuda(const at::Tensor& x_, const at::Tensor& p_,
                                     const at::Tensor& labels_, double scale, int64_t kind,
                                     double lam, bool same_label, int64_t chunk) {
  check_call(x_, p_, labels_, chunk, lam);
  check_nca_args(scale, kind);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  const int64_t n_part = (B + kThreads - 1) / kThreads;  // blocks per row
  at::Tensor rows = at::zeros({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_metrix_fwd_cuda", [&] {
    using T = scalar_t;
    const at::Tensor st = at::mm(p, x.t()).contiguous();
    NcaArgs<T> k{make_mix<T>(st, y32, B, C, lam, same_label), T(scale), kind == kNcaCosine,
                 nullptr, nullptr, nullptr};
    if (C == 0) return;  // then B = 0 too (labels in [0, C))
    const int64_t rows_per = block_rows(chunk, C);
    // the block totals of one Gram block's rows (rows_per × B/256: O(chunk), not B²)
    at::Tensor part = at::empty({std::min(rows_per, B), n_part}, x.options());
    for_gram_blocks(x, rows_per, [&](int64_t a0, int64_t n, const at::Tensor& g) {
      k.m.at_block(a0, n, g);
      nca_fwd_kernel<T><<<entry_grid(B, n), kThreads, 0, stream()>>>(k, part.data_ptr<T>(), n_part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      rows.narrow(0, a0, n).copy_(part.narrow(0, 0, n).sum(1));  // fixed order per row
    });
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor> proxy_nca_metrix_bwd_cuda(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& p_,
    const at::Tensor& labels_, double scale, int64_t kind, double lam, bool same_label,
    int64_t chunk) {
  check_call(x_, p_, labels_, chunk, lam);
  check_nca_args(scale, kind);
  check_row_vec(grad_rows_, x_, "grad_rows");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), p = p_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  auto q = grad_rows_.to(x.scalar_type()).contiguous();
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  at::Tensor dx = at::zeros_like(x), dsp = at::zeros({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_metrix_bwd_cuda", [&] {
    using T = scalar_t;
    const at::Tensor st = at::mm(p, x.t()).contiguous();
    NcaArgs<T> k{make_mix<T>(st, y32, B, C, lam, same_label), T(scale), kind == kNcaCosine,
                 q.data_ptr<T>(), nullptr, nullptr};
    if (C == 0) return;
    const int64_t rows_per = block_rows(chunk, C);
    at::Tensor lse = at::empty({2, std::min(rows_per, B), B}, x.options());
    k.lse1 = lse.data_ptr<T>();
    k.lse2 = k.lse1 + lse.size(1) * B;
    for_gram_blocks(x, rows_per, [&](int64_t a0, int64_t n, const at::Tensor& g) {
      k.m.at_block(a0, n, g);
      nca_lse_kernel<T><<<entry_grid(B, n), kThreads, 0, stream()>>>(k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dsp_kernel<NcaArgs<T>, T><<<warp_blocks(n, C), kThreads, 0, stream()>>>(k, dsp.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gram_grad_kernel<NcaArgs<T>, T><<<entry_grid(B, n), kThreads, 0, stream()>>>(k, g.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dx.narrow(0, a0, n).addmm_(g, x);
    });
  });
  dx.addmm_(dsp, p);
  return {dx, at::mm(dsp.t(), x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("proxy_anchor_metrix_fwd", &proxy_anchor_metrix_fwd_cuda);
  m.impl("proxy_anchor_metrix_bwd", &proxy_anchor_metrix_bwd_cuda);
  m.impl("proxy_nca_metrix_fwd", &proxy_nca_metrix_fwd_cuda);
  m.impl("proxy_nca_metrix_bwd", &proxy_nca_metrix_bwd_cuda);
}

}  // namespace metrix_ops
