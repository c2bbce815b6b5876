// The CUDA engine of embedding-level Metrix (pairs "pos_neg" or "anchor_neg"): anchors X
// against columns C, which are the batch itself (C = X, self pairs excluded) or references
// (`ref_emb`, a memory bank; each anchor's own row of them, if any, excluded). Per anchor a,
// its closed-form candidates
//
//     V(a) = { mix(c_p, c_n, λ) : p ∈ P(a), n ∈ N(a) }   (mix(a, c_n) under "anchor_neg" or
//                                                          when a has no positive in C),
//     s̃ = r_pn (λ s_ap + (1−λ) s_an),  r_pn = 1/‖λ c_p + (1−λ) c_n‖ from (C Cᵀ)_pn
//
// (common/metrix_mix.h; P(a): the columns of a's class but its own, N(a): the other
// classes'), folded into a loss-given per-anchor state, and the gradient of the loss back into
// the Gram entries. No mixed point is materialised and no B×M matrix is held: anchors and
// columns are label-sorted (the caller sorts), and per chunk of whole classes one cuBLAS
// product S = Q Cᵀ holds every Gram entry its anchors' candidates need, Q being the chunk's
// anchors and, against references, its classes' positives stacked below them (against the
// batch an anchor's positives are rows of its own class: the anchor rows serve). A host-built
// plan (MixPlan) says, per anchor, where its positives' rows of S are, and per positive row
// which anchors mix it.
//
// Forward: a warp per anchor, lanes over strided columns (its negatives), each lane looping
// over the anchor's positives; the lanes' states merge by a fixed shuffle tree.
// Backward: the chunk is recomputed, and G = ∂L/∂S is built by two kernels, each recomputing
// the candidates and their weights w = ∂L/∂s̃:
//   anchors (a warp per anchor row a): G[a, n] += w (1−λ) r_pn over p, and G[a, p] =
//     Σ_n w λ r_pn (a warp reduction per positive p);
//   positives (a warp per positive row p): G[p, n] += Σ_a w ∂s̃/∂s_pn over the anchors a
//     mixing p, ∂s̃/∂s_pn = −s̃ λ(1−λ) r_pn² (0 where ‖v‖ is clamped).
// Every entry has one writer per kernel (a warp owns its row): no atomics, deterministic. The
// candidates are recomputed rather than stored: there are |P(a)|·M per anchor. Then
// dQ = G C, dCᵀ += Gᵀ Q (cuBLAS): the anchor rows of dQ go to dX and the positive rows to
// their rows of dC (distinct rows per chunk).
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

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/metrix_mix.h"
#include "cpu/refs_runs.h"  // host only, defined out of line
#include "cuda/pair_rows.cuh"  // shfl_down_state

namespace metrix_ops {
namespace cuda_metrix {

constexpr int kWarps = 8;  // rows (one warp each) per block
constexpr int kThreads = 32 * kWarps;

// The mix's weight λ and the norm of a mixed point
template <typename T>
struct MixGeom {
  T lam;
  // 1/‖λ c_p + (1−λ) c_n‖ from s_pn, ‖v‖ clamped below at kMixEps; *clamped when it is
  __device__ __forceinline__ T inv_norm(T s_pn, bool* clamped) const {
    const T q = lam * lam + (T(1) - lam) * (T(1) - lam) + T(2) * lam * (T(1) - lam) * s_pn;
    const T eps2 = T(kMixEps) * T(kMixEps);
    *clamped = !(q > eps2);
    return *clamped ? T(1) / T(kMixEps) : T(1) / std::sqrt(q);
  }
};

// A call's plan on the device (MixPlan::layout): anchors are numbered in sorted order, and
// anchor a is row a − lo of its chunk's S
struct Layout {
  const int64_t* labels;      // per anchor
  const int64_t* col_labels;  // per column of S
  const int64_t* pcol0;       // per anchor: its class's first column, and how many there are
  const int64_t* pcnt;        //   (its positives: those columns but its own)
  const int64_t* own;         // per anchor: its own column (no pair, no positive), −1: none
  const int64_t* prow0;       // per anchor: the row of S holding column pcol0's (C Cᵀ) row
  const int64_t* qcol;        // per positive row of the plan: its column
  const int64_t* qalo;        //   and the anchors that mix it, [qalo, qahi) (but the one
  const int64_t* qahi;        //   whose own column it is)
  bool anchor_neg;
};

// One chunk's rows of S (ncols columns): anchors lo .. lo + na as rows 0 .. na, and the plan's
// positive rows q0 .. q0 + np as rows pr0 .. pr0 + np
struct ChunkRows {
  int64_t lo, na, q0, np, pr0, ncols;
};

// Anchor a mixes itself with each negative (no positive to mix, or "anchor_neg")
__device__ __forceinline__ bool mixes_itself(const Layout& L, int64_t a) {
  return L.anchor_neg || L.pcnt[a] == (L.own[a] >= 0 ? 1 : 0);
}

template <typename T>
__device__ __forceinline__ T warp_total(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Forward of the chunk's anchors: out[a] = anchor a's folded state.
template <class Loss, typename T>
__global__ void mix_fold_kernel(const T* __restrict__ S, ChunkRows c, Layout L, MixGeom<T> geo,
                                Loss loss, typename Loss::State* __restrict__ out) {
  using State = typename Loss::State;
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= c.na) return;  // the whole warp: i is the warp's
  const int64_t a = c.lo + i, la = L.labels[a], p0 = L.pcol0[a], K = L.pcnt[a], own = L.own[a];
  const int64_t B = c.ncols;
  const T* Sa = S + i * B;
  const T* Sp = S + L.prow0[a] * B;  // column p0's row
  const bool self_mix = mixes_itself(L, a);
  const T lam = geo.lam, mu = T(1) - geo.lam;
  State st = State::empty();
  bool clamped;
  for (int64_t n = lane; n < B; n += 32) {
    if (L.col_labels[n] == la) continue;  // negatives only (the own column included)
    const T s_an = Sa[n];
    if (self_mix) {
      loss.push(st, geo.inv_norm(s_an, &clamped) * (lam + mu * s_an));
      continue;
    }
    for (int64_t j = 0; j < K; ++j) {
      if (p0 + j == own) continue;
      const T r = geo.inv_norm(Sp[j * B + n], &clamped);
      loss.push(st, r * (lam * Sa[p0 + j] + mu * s_an));
    }
  }
  for (int off = 16; off > 0; off >>= 1) {  // every lane shuffles (full mask)
    const State other = cuda_pairs::shfl_down_state(st, off);
    if (lane < off) st.merge(other);
  }
  if (lane == 0) out[a] = st;
}

// Backward, the anchors' entries: G[a, n] (negatives) and G[a, p] (its positives)
template <class Loss, typename T>
__global__ void mix_grad_anchor_kernel(const T* __restrict__ S, T* __restrict__ G, ChunkRows c,
                                       Layout L, MixGeom<T> geo, Loss loss) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= c.na) return;
  const int64_t a = c.lo + i, la = L.labels[a], p0 = L.pcol0[a], K = L.pcnt[a], own = L.own[a];
  if (!loss.live(a)) return;  // G stays 0
  const int64_t B = c.ncols;
  const T* Sa = S + i * B;
  T* Ga = G + i * B;
  const T lam = geo.lam, mu = T(1) - geo.lam;
  bool clamped;
  if (mixes_itself(L, a)) {  // s̃ = r(s_an)(λ + (1−λ) s_an): both terms land on G[a, n]
    for (int64_t n = lane; n < B; n += 32) {
      if (L.col_labels[n] == la) continue;
      const T s_an = Sa[n];
      const T r = geo.inv_norm(s_an, &clamped);
      const T v = r * (lam + mu * s_an);
      const T dv = mu * r - (clamped ? T(0) : v * lam * mu * r * r);
      Ga[n] += loss.weight(v, a) * dv;
    }
    return;
  }
  const T* Sp = S + L.prow0[a] * B;
  for (int64_t j = 0; j < K; ++j) {
    const int64_t p = p0 + j;
    if (p == own) continue;
    const T s_ap = Sa[p];
    const T* Sj = Sp + j * B;
    T acc = T(0);  // Σ over this lane's negatives of w λ r_pn
    for (int64_t n = lane; n < B; n += 32) {
      if (L.col_labels[n] == la) continue;
      const T r = geo.inv_norm(Sj[n], &clamped);
      const T w = loss.weight(r * (lam * s_ap + mu * Sa[n]), a);
      Ga[n] += w * mu * r;
      acc += w * lam * r;
    }
    acc = warp_total(acc);
    if (lane == 0) Ga[p] += acc;
  }
}

// Backward, the positives' entries: G[p, n] over the anchors a that mix p
template <class Loss, typename T>
__global__ void mix_grad_positive_kernel(const T* __restrict__ S, T* __restrict__ G, ChunkRows c,
                                         Layout L, MixGeom<T> geo, Loss loss) {
  const int64_t k = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= c.np || L.anchor_neg) return;  // under anchor_neg no anchor mixes a positive
  const int64_t q = c.q0 + k, p = L.qcol[q], lp = L.col_labels[p];
  const int64_t a0 = L.qalo[q], a1 = L.qahi[q], B = c.ncols;
  const T* Sp = S + (c.pr0 + k) * B;
  T* Gp = G + (c.pr0 + k) * B;
  const T lam = geo.lam, mu = T(1) - geo.lam;
  bool clamped;
  for (int64_t n = lane; n < B; n += 32) {
    if (L.col_labels[n] == lp) continue;
    const T r = geo.inv_norm(Sp[n], &clamped);
    if (clamped) continue;  // ∂s̃/∂s_pn = 0
    T acc = T(0);
    for (int64_t a = a0; a < a1; ++a) {
      if (L.own[a] == p || mixes_itself(L, a) || !loss.live(a)) continue;
      const T* Sa = S + (a - c.lo) * B;
      const T v = r * (lam * Sa[p] + mu * Sa[n]);
      acc += loss.weight(v, a) * (-v * lam * mu * r * r);
    }
    Gp[n] += acc;
  }
}

// The self ops' checks: unit rows x (fp32/fp64, CUDA), the sorted labels and each row's class
// start and size (int64, x's device), λ in [0, 1], chunk > 0
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

// The refs ops' checks: unit anchors x and references r (fp32/fp64, one dtype, CUDA), their
// int64 labels and each anchor's own row of r (−1: none), all on x's device
inline void check_refs_call(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                            const at::Tensor& ref_labels, const at::Tensor& own, double lam,
                            int64_t chunk) {
  check_pair_op_inputs(x, r, labels, ref_labels, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  TORCH_CHECK(own.dim() == 1 && own.size(0) == x.size(0) && own.scalar_type() == at::kLong,
              "self must be int64 of shape (", x.size(0), ",)");
  TORCH_CHECK(own.device() == x.device(), "self must be on ", x.device(), ", got ",
              own.device());
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
}

// The anchors and positive rows of one chunk of the plan
struct ChunkPlan {
  int64_t lo, hi;  // anchors
  int64_t q0, q1;  // positive rows of the plan
};

// One call's inputs (contiguous) and its plan: Layout's tables on the device, the chunks
struct MixPlan {
  at::Tensor x, c, labels, col_labels;  // c is x (and col_labels labels) against the batch
  bool extra = false;  // Q stacks the positives' rows of C below the anchors (references)
  at::Tensor table;    // int64: pcol0, pcnt, own, prow0 (B each), qcol, qalo, qahi (P each)
  int64_t P = 0;
  std::vector<ChunkPlan> chunks;

  Layout layout(bool anchor_neg) const {
    const int64_t B = x.size(0);
    const int64_t* t = table.data_ptr<int64_t>();
    return {labels.data_ptr<int64_t>(), col_labels.data_ptr<int64_t>(), t, t + B, t + 2 * B,
            t + 3 * B, t + 4 * B, t + 4 * B + P, t + 4 * B + 2 * P, anchor_neg};
  }
  ChunkRows rows(const ChunkPlan& ch) const {
    const int64_t na = ch.hi - ch.lo;
    return {ch.lo, na, ch.q0, ch.q1 - ch.q0, extra ? na : 0, c.size(0)};
  }
  // the columns of the chunk's positive rows (references: distinct rows of C)
  at::Tensor qcols(const ChunkPlan& ch) const {
    return table.narrow(0, 4 * x.size(0) + ch.q0, ch.q1 - ch.q0);
  }
  // Q: the chunk's anchors, then (references) its positives
  at::Tensor q(const ChunkPlan& ch) const {
    const at::Tensor xa = x.narrow(0, ch.lo, ch.hi - ch.lo);
    return extra ? at::cat({xa, c.index_select(0, qcols(ch))}) : xa;
  }
};

// The host tables of a plan of B anchors and P positive rows, filled by the builders, then
// uploaded as MixPlan::table
struct HostTables {
  std::vector<int64_t> v;
  int64_t B, P;
  HostTables(int64_t B_, int64_t P_) : v(4 * B_ + 3 * P_), B(B_), P(P_) {}
  void anchor(int64_t a, int64_t pcol0, int64_t pcnt, int64_t own, int64_t prow0) {
    v[a] = pcol0, v[B + a] = pcnt, v[2 * B + a] = own, v[3 * B + a] = prow0;
  }
  void positive(int64_t q, int64_t col, int64_t alo, int64_t ahi) {
    v[4 * B + q] = col, v[4 * B + P + q] = alo, v[4 * B + 2 * P + q] = ahi;
  }
  at::Tensor upload(const at::Device& dev) const {
    at::Tensor t = at::empty({(int64_t)v.size()}, at::TensorOptions().dtype(at::kLong));
    if (!v.empty()) std::memcpy(t.data_ptr<int64_t>(), v.data(), v.size() * sizeof(int64_t));
    return t.to(dev);
  }
};

// The batch against itself (after check_mix_call, under the device guard): chunks of whole
// classes of the sorted batch, about `chunk` rows each (a class larger than that is a chunk
// of its own); every row is an anchor and, for its class's other anchors, a positive row.
inline MixPlan self_plan(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& cstart,
                         const at::Tensor& csize, int64_t chunk) {
  MixPlan p;
  p.x = p.c = x.contiguous();
  p.labels = p.col_labels = labels.contiguous();
  const int64_t B = p.x.size(0);
  p.P = B;
  const at::Tensor st = cstart.cpu().contiguous(), sz = csize.cpu().contiguous();
  const int64_t *s = st.data_ptr<int64_t>(), *k = sz.data_ptr<int64_t>();
  HostTables h(B, B);
  for (int64_t r = 0; r < B;) {
    TORCH_CHECK(s[r] == r && k[r] > 0 && r + k[r] <= B,
                "class_start/class_size must describe the classes of a label-sorted batch");
    const int64_t end = r + k[r];
    for (int64_t q = r + 1; q < end; ++q)  // every row of the class: the kernels trust them
      TORCH_CHECK(s[q] == r && k[q] == k[r],
                  "class_start/class_size must describe the classes of a label-sorted batch");
    if (p.chunks.empty() || (end - p.chunks.back().lo > chunk && r > p.chunks.back().lo))
      p.chunks.push_back({r, r, r, r});
    ChunkPlan& ch = p.chunks.back();
    for (int64_t a = r; a < end; ++a) {
      h.anchor(a, r, k[r], a, r - ch.lo);  // own column: itself
      h.positive(a, a, r, end);
    }
    ch.hi = ch.q1 = r = end;
  }
  p.table = h.upload(p.x.device());
  return p;
}

// Anchors against references (after check_refs_call, under the device guard): both sorted by
// label (checked by class_runs); each class's run of anchors and its run of references (its
// positives; none under anchor_neg), the runs taken in chunks of whole classes whose rows of
// Q (anchors and positives) come to about `chunk` (a class larger than that is a chunk of
// its own).
inline MixPlan refs_plan(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                         const at::Tensor& ref_labels, const at::Tensor& own, int64_t chunk,
                         bool anchor_neg) {
  MixPlan p;
  p.x = x.contiguous();
  p.c = r.contiguous();
  p.labels = labels.contiguous();
  p.col_labels = ref_labels.contiguous();
  p.extra = true;
  const at::Tensor yh = p.labels.cpu(), ryh = p.col_labels.cpu(), oh = own.cpu().contiguous();
  const int64_t *y = yh.data_ptr<int64_t>(), *yr = ryh.data_ptr<int64_t>();
  const int64_t* o = oh.data_ptr<int64_t>();
  const int64_t B = p.x.size(0), M = p.c.size(0);
  std::vector<ClassRun> runs = class_runs(y, B, yr, M, o);  // checked there
  for (ClassRun& u : runs) {
    if (anchor_neg) u.phi = u.plo;  // every anchor mixes itself: no positive rows in Q
    p.P += u.phi - u.plo;
  }
  HostTables h(B, p.P);
  int64_t q = 0;  // the next positive row of the plan
  for (size_t k0 = 0; k0 < runs.size();) {
    size_t k1 = k0;
    int64_t rows = 0;  // the chunk's rows of Q
    while (k1 < runs.size()) {
      const int64_t add = runs[k1].hi - runs[k1].lo + runs[k1].phi - runs[k1].plo;
      if (k1 > k0 && rows + add > chunk) break;
      rows += add;
      ++k1;
    }
    const int64_t lo = runs[k0].lo, na = runs[k1 - 1].hi - lo, q0 = q;
    for (size_t k = k0; k < k1; ++k) {
      const ClassRun& u = runs[k];
      for (int64_t a = u.lo; a < u.hi; ++a) h.anchor(a, u.plo, u.phi - u.plo, o[a], na + q - q0);
      for (int64_t col = u.plo; col < u.phi; ++col) h.positive(q++, col, u.lo, u.hi);
    }
    p.chunks.push_back({lo, lo + na, q0, q});
    k0 = k1;
  }
  p.table = h.upload(p.x.device());
  return p;
}

// Forward: every anchor's folded state into out (B states in device memory)
template <class Loss, typename T>
void fold_all_mix(const MixPlan& p, bool anchor_neg, T lam, const Loss& loss,
                  typename Loss::State* out) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const ChunkPlan& ch : p.chunks) {
    const ChunkRows c = p.rows(ch);
    const at::Tensor S = at::mm(p.q(ch), p.c.t()).contiguous();
    mix_fold_kernel<Loss, T><<<(unsigned)((c.na + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        S.data_ptr<T>(), c, p.layout(anchor_neg), MixGeom<T>{lam}, loss, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Backward: (dx, dc) of the loss whose candidate weights `loss` gives; dc is dx against the
// batch, zeros against references unless need_dc
template <class Loss, typename T>
std::pair<at::Tensor, at::Tensor> grad_all_mix(const MixPlan& p, bool anchor_neg, T lam,
                                               const Loss& loss, bool need_dc) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor dx = at::zeros_like(p.x);
  at::Tensor dc = p.extra ? at::zeros_like(p.c) : dx;
  for (const ChunkPlan& ch : p.chunks) {
    const ChunkRows c = p.rows(ch);
    const at::Tensor Q = p.q(ch);
    const at::Tensor S = at::mm(Q, p.c.t()).contiguous();
    at::Tensor G = at::zeros_like(S);
    const Layout L = p.layout(anchor_neg);
    mix_grad_anchor_kernel<Loss, T><<<(unsigned)((c.na + kWarps - 1) / kWarps), kThreads, 0,
                                      stream>>>(S.data_ptr<T>(), G.data_ptr<T>(), c, L,
                                                MixGeom<T>{lam}, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (c.np > 0 && (need_dc || !p.extra)) {  // extra positive rows feed dC alone
      mix_grad_positive_kernel<Loss, T><<<(unsigned)((c.np + kWarps - 1) / kWarps), kThreads, 0,
                                          stream>>>(S.data_ptr<T>(), G.data_ptr<T>(), c, L,
                                                    MixGeom<T>{lam}, loss);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // the anchors' rows (all of G against the batch, whose positive rows are anchor rows)
    dx.narrow(0, c.lo, c.na).addmm_(G.narrow(0, 0, c.na), p.c);
    if (!p.extra) {
      dx.addmm_(G.t(), Q);
      continue;
    }
    if (!need_dc) continue;
    dc.addmm_(G.t(), Q);
    if (c.np > 0) dc.index_add_(0, p.qcols(ch), at::mm(G.narrow(0, c.na, c.np), p.c));
  }
  return {dx, dc};
}

}  // namespace cuda_metrix
}  // namespace metrix_ops
