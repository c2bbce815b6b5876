// Embedding Expansion for MultiSimilarity, LiftedStructure, GeneralizedLiftedStructure, NPairs
// (ee_neg_lse_*) and TripletMarginLoss "all" (ee_triplet_*) on the CUDA engine: the CPU ops'
// schemas (csrc/cpu/ee_losses_cpu.cpp, whose comment has the math), so the glue
// fused/ee_losses.py and the autograd of ops/ee_losses.py run unchanged on CUDA tensors.
//
// Per anchor i and negative point q (an original of another class, or a synthetic point of
// another class, never materialised: q = (q_u, q_w, λ_q)) the hard-negative-pair cosine
//     ŝ(i, q) = max_{a ∈ A_i} s(a, q),  s(a, q) = (λ_a H[a_u, q] + μ_a H[a_w, q]) / (‖a‖‖q‖),
//     H[r, q] = λ_q U[r, q_u] + μ_q U[r, q_w],
// A_i = x_i, then the n points of each of i's segments (the layout of cpu/ee_layout.h, the
// CPU op's, so ties go to the same earliest a), in the CPU op's rounding (no FMA contraction).
//
// Streaming as the CPU op: the batch label-sorted ("slots") and cut into chunks of whole
// classes; per chunk pair (t1 anchors, t2 points) one cuBLAS product U = X̂_t1 X̂_t2ᵀ, and the
// points of t2 (its originals, then its segments' points) in tiles. Per tile a thread per
// (anchor, point) computes ŝ and its winner (blocks of 256 points of one anchor, so the loops
// over A_i are warp-uniform). Forward: the tile's terms, reduced per anchor by ATen (a
// log-sum-exp, or the triplet sums). Backward, from the recomputed ŝ (no B×P table kept):
//   - per (anchor, point) its weight w = ∂L/∂ŝ and the winner (tile buffers Wn = w/(‖a‖‖q‖),
//     ARG, C = w·ŝ);
//   - Tg[r, q] = ∂L/∂H: a thread per (row, point) sums over the anchors of the row's class in
//     slot order (the CPU op's order);
//   - ∂L/∂U: a thread per (row, column) gathers the points with that column as an endpoint
//     (a CSR built on the host, in point order, the CPU op's order); then two cuBLAS products
//     into ∂L/∂X̂ for both chunks;
//   - the synthetic points' norms: ∂L/∂‖q‖ = −Σ_i C / ‖q‖ (a column sum per point), and
//     ∂L/∂‖a‖ = −Σ_q C / ‖a‖ over the pairs a won: per warp, a sum per distinct winner (a
//     ballot loop), into per-warp partials that one thread per side point folds over both of
//     its segment's anchors; at the end they reach the segments' Gram entries, so X̂.
// Every buffer entry has one writer per kernel and the kernels run in a fixed order: no
// atomics, deterministic. Memory O(B·D + P + c·(c + tile)), c a chunk's rows (GPU_CHUNK, or
// the largest class: a chunk holds whole classes), never B×B nor B×P.
// fp32/fp64 (the driver computes half inputs in fp32).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/expansion.h"
#include "cpu/ee_layout.h"

namespace metrix_ops {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxRows = 65535;  // anchor rows per launch: the grid's y dimension
constexpr int64_t kTileEntries = int64_t(1) << 23;  // anchor rows × points of a tile's buffers
// per-warp partial sums of a backward tile (entries of A_i's and of the positives, times warps
// of points): the tile narrows to keep them within this
constexpr int64_t kPartials = int64_t(1) << 24;

// rounded as written, no FMA contraction: the CPU kernels' (and the reference's) rounding, so
// that exact ties (duplicate rows, a segment's point on x_i) fall the same way
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
template <typename T>
__device__ __forceinline__ T lin_rn(T a, T x, T b, T y) {
  return add_rn(mul_rn(a, x), mul_rn(b, y));
}

// the same value in every lane (a + b == b + a), in a fixed order: deterministic
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T ee_metric(T s, bool l2) {
  return l2 ? ee_safe_sqrt(T(2) - T(2) * s) : s;
}
// ∂m̂/∂ŝ at m̂ = m: 1, or −1/d̂ (0 where safe_sqrt is flat)
template <typename T>
__device__ __forceinline__ T ee_dmetric(T m, bool l2) {
  return l2 ? (m > T(0) ? T(-1) / m : T(0)) : T(1);
}

// The call's tables on the device (built by Tables, below).
template <typename T>
struct Tabs {
  int64_t n;
  const T* lam;  // λ_k = k/(n+1), k = 0..n, rounded once from double as ee_lambda
  const T* nrm;  // per synthetic point e·n + k − 1: its norm (clamped, ee_point_norm)
  // per slot (label-sorted row)
  const int32_t* cls;      // its class
  const int64_t* cstart;   // per class: its first slot (C + 1 entries)
  const bool* amask;       // the anchor is computed
  const int64_t* side_off;  // its segments in A_i: entries [side_off[s], side_off[s + 1])
  const int64_t* side_u;    // per entry: the segment's endpoints (slots) and index
  const int64_t* side_w;
  const int64_t* side_seg;
  // per point, chunk by chunk (a chunk's originals in slot order, then its classes'
  // segments' points, as the CPU op's points_of)
  const int32_t* pu;    // endpoints, as rows of the point chunk
  const int32_t* pw;
  const int32_t* pk;    // 0: an original; else k in 1..n
  const int64_t* ppid;  // synthetic index, −1: an original
  const int32_t* pcls;
  const bool* pok;  // may be a negative (neg_mask; synthetic points always)
};

// One tile: anchors of slots [r0, r0 + nr) against points [q0, q0 + nt) of the chunk whose
// slots are [c0, c0 + nc) and whose first point is p0; U is their nr × nc product. A launch
// takes the rows from y0 on, one per block row (over_rows).
struct Tile {
  int64_t r0, nr, c0, nc, p0, q0, nt, y0;
};

// launch(tile, rows) over the tile's anchor rows in slabs of at most kMaxRows, the grid's y
// limit (a class larger than that is a chunk of its own, with pairs="adjacent")
template <class Launch>
void over_rows(const Tile& tl, Launch&& launch) {
  for (int64_t y0 = 0; y0 < tl.nr; y0 += kMaxRows) {
    Tile t = tl;
    t.y0 = y0;
    launch(t, unsigned(std::min(kMaxRows, tl.nr - y0)));
  }
}

template <typename T>
struct Closest {
  T best, qn;
  int arg;  // index into A_i (0: x_i); −1 only in an idle lane
  bool term;
};

// ŝ(i, q) and its earliest winner for the anchor at row r and the tile's point q.
template <typename T>
__device__ Closest<T> closest(const Tabs<T>& tb, const Tile& tl, const T* __restrict__ U,
                              int64_t r, int64_t q) {
  const int64_t p = tl.p0 + tl.q0 + q, s = tl.r0 + r, n = tb.n;
  const int32_t qu = tb.pu[p], qw = tb.pw[p];
  const int64_t pid = tb.ppid[p];
  const T qlam = tb.lam[tb.pk[p]], qmu = T(1) - qlam;
  const T qn = pid < 0 ? T(1) : tb.nrm[pid];
  auto h = [&](int64_t row) {
    const T* u = U + row * tl.nc;
    return pid < 0 ? u[qu] : lin_rn(qlam, u[qu], qmu, u[qw]);
  };
  const T hi = h(r);
  // a = 0: x_i itself, (1·h + 0·h) / (1·‖q‖) as the CPU op's side entry, taken as is (a NaN
  // stays, as the CPU op's combine starts from it)
  Closest<T> c{lin_rn(T(1), hi, T(0), hi) / mul_rn(T(1), qn), qn, 0, false};
  int a = 1;
  for (int64_t e = tb.side_off[s]; e < tb.side_off[s + 1]; ++e) {
    const int64_t u = tb.side_u[e] - tl.r0, w = tb.side_w[e] - tl.r0, base = tb.side_seg[e] * n;
    const T hu = u == r ? hi : h(u), hw = w == r ? hi : h(w);
    for (int64_t k = 1; k <= n; ++k, ++a) {
      const T lam = tb.lam[k];
      const T sv = lin_rn(lam, hu, T(1) - lam, hw) / mul_rn(tb.nrm[base + k - 1], qn);
      if (sv > c.best) c.best = sv, c.arg = a;  // strict: the earliest keeps a tie
    }
  }
  c.term = tb.pcls[p] != tb.cls[s] && tb.pok[p] && tb.amask[s];
  return c;
}

// Forward, log-sum-exp ops: the tile's terms scale·m̂ + offset (−inf: not a term).
template <typename T>
__global__ void lse_terms_kernel(Tabs<T> tb, Tile tl, const T* __restrict__ U, bool l2,
                                 T scale, T offset, T* __restrict__ val) {
  const int64_t r = tl.y0 + blockIdx.y, q = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (q >= tl.nt) return;
  const Closest<T> c = closest(tb, tl, U, r, q);
  val[r * tl.nt + q] =
      c.term ? scale * ee_metric(c.best, l2) + offset : -std::numeric_limits<T>::infinity();
}

// The anchor's positives: their clean metrics pos[off[s] ..] (np[s] of them).
template <typename T>
struct Positives {
  const T* pos;
  const int64_t* off;  // per slot: its anchor's first entry
  const int32_t* np;   // per slot: |class| − 1
  T margin;
  bool smooth;
};

// Forward, triplet: per (anchor, point) Σ_p f(v) and #f > 0 over the anchor's positives
// (−1: not a term, or no positive: no triplet).
template <typename T>
__global__ void trip_terms_kernel(Tabs<T> tb, Tile tl, const T* __restrict__ U, bool l2,
                                  Positives<T> ps, T* __restrict__ fsum,
                                  int32_t* __restrict__ fcount) {
  const int64_t r = tl.y0 + blockIdx.y, q = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (q >= tl.nt) return;
  const int64_t s = tl.r0 + r, np = ps.np[s];
  const Closest<T> c = closest(tb, tl, U, r, q);
  T acc = 0;
  int32_t k = -1;
  if (c.term && np > 0) {
    const T mh = ee_metric(c.best, l2);
    const T* p = ps.pos + ps.off[s];
    k = 0;
    for (int64_t j = 0; j < np; ++j) {
      const T f = ee_trip_f((l2 ? p[j] - mh : mh - p[j]) + ps.margin, ps.smooth);
      acc += f;
      k += f > T(0);
    }
  }
  fsum[r * tl.nt + q] = acc;
  fcount[r * tl.nt + q] = k;
}

// What the backward of a loss needs per slot: the incoming gradient, whether the anchor takes
// part (amask, g ≠ 0, a finite lse or a positive), and for the log-sum-exp its lse.
template <typename T>
struct Upstream {
  const T* g;
  const bool* act;
  const T* lse;
  T scale, offset;
};

// Per-tile buffers of the backward.
template <typename T>
struct Grads {
  T* wn;         // nr × nt: w / (‖a‖‖q‖), 0 where no gradient
  int32_t* arg;  // nr × nt: the winner in A_i
  T* cw;         // nr × nt: w · ŝ
  T* spart;      // per (side point of the anchor chunk, warp of points): Σ w·ŝ it won
  T* ppart;      // triplet: per (positive of the anchor chunk, warp): Σ ∂L/∂pos
  const int64_t* side_flat;  // per slot: its A_i's first entry in the chunk's side list
  const int64_t* pos_flat;   // per slot: its positives' first entry in the chunk's list
  int64_t nqw;               // warps of points in the tile
};

// Backward, step 1: per (anchor, point) the weight w = ∂L/∂ŝ and the winner, and per warp the
// winners' partial sums of w·ŝ (and, TRIP, of ∂L/∂pos). Every thread of a warp reaches the
// ballots and shuffles (no early return).
template <typename T, bool TRIP>
__global__ void weights_kernel(Tabs<T> tb, Tile tl, const T* __restrict__ U, bool l2,
                               Upstream<T> up, Positives<T> ps, Grads<T> gr) {
  const int64_t r = tl.y0 + blockIdx.y, q = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const int64_t qw = q / 32, s = tl.r0 + r, n = tb.n;
  const bool valid = q < tl.nt;
  Closest<T> c{T(0), T(1), -1, false};
  if (valid) c = closest(tb, tl, U, r, q);
  const bool live = valid && c.term && up.act[s];
  T w = 0;
  if constexpr (!TRIP) {
    if (live) {  // g · e^{scale·m̂ + offset − lse} · scale · ∂m̂/∂ŝ
      const T m = ee_metric(c.best, l2);
      const T e = std::exp(up.scale * m + up.offset - up.lse[s]);
      if (e != T(0)) w = e * (up.g[s] * up.scale * ee_dmetric(m, l2));
    }
  } else {
    const int64_t np = ps.np[s];  // the same in the whole warp (one anchor)
    const T mh = live ? ee_metric(c.best, l2) : T(0);
    const T* p = ps.pos + ps.off[s];
    const int64_t pbase = gr.pos_flat[s] - gr.pos_flat[tl.r0];
    T sum = 0;
    for (int64_t j = 0; j < np; ++j) {
      T df = 0;
      if (live) df = up.g[s] * ee_trip_df((l2 ? p[j] - mh : mh - p[j]) + ps.margin, ps.smooth);
      sum += df;
      const T d = warp_sum(l2 ? df : -df);
      if (lane == 0 && qw < gr.nqw) gr.ppart[(pbase + j) * gr.nqw + qw] = d;
    }
    if (live) w = (l2 ? -sum : sum) * ee_dmetric(mh, l2);
  }
  const bool win = w != T(0) && c.arg >= 0;
  T na = 1;
  if (win && c.arg > 0) {
    const int64_t e = tb.side_off[s] + (c.arg - 1) / n, k = (c.arg - 1) % n + 1;
    na = tb.nrm[tb.side_seg[e] * n + k - 1];
  }
  const T cv = win ? w * c.best : T(0);
  if (valid) {
    gr.wn[r * tl.nt + q] = win ? w / mul_rn(na, c.qn) : T(0);
    gr.arg[r * tl.nt + q] = c.arg;
    gr.cw[r * tl.nt + q] = cv;
  }
  // one sum per distinct synthetic winner of the warp (a = 0, x_i, has no norm to move)
  const int64_t sbase = gr.side_flat[s] - gr.side_flat[tl.r0];
  bool pending = win && c.arg > 0;
  for (;;) {
    const unsigned m = __ballot_sync(kFull, pending);
    if (m == 0) break;
    const int key = __shfl_sync(kFull, c.arg, __ffs(m) - 1);
    const bool mine = pending && c.arg == key;
    const T v = warp_sum(mine ? cv : T(0));
    if (lane == 0) gr.spart[(sbase + key) * gr.nqw + qw] = v;
    pending = pending && !mine;
  }
}

// Backward, step 2: Tg[r, q] = ∂L/∂H[r, q], over the anchors of row r's class in slot order.
template <typename T>
__global__ void tg_kernel(Tabs<T> tb, Tile tl, const T* __restrict__ wn,
                          const int32_t* __restrict__ arg, T* __restrict__ tg) {
  const int64_t r = tl.y0 + blockIdx.y, q = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (q >= tl.nt) return;
  const int64_t s = tl.r0 + r, cl = tb.cls[s], n = tb.n;
  T acc = 0;
  for (int64_t si = tb.cstart[cl]; si < tb.cstart[cl + 1]; ++si) {
    const int64_t ri = si - tl.r0;
    const T v = wn[ri * tl.nt + q];
    if (v == T(0)) continue;
    const int a = arg[ri * tl.nt + q];
    if (a == 0) {  // x_i: λ = 1 on its own row
      if (ri == r) acc += v;
      continue;
    }
    const int64_t e = tb.side_off[si] + (a - 1) / n, k = (a - 1) % n + 1;
    const T lam = tb.lam[k];
    if (tb.side_u[e] - tl.r0 == r) acc += lam * v;
    if (tb.side_w[e] - tl.r0 == r) acc += (T(1) - lam) * v;
  }
  tg[r * tl.nt + q] = acc;
}

// The points with a given column as an endpoint: per slot of the point chunk, entries
// [off[c], off[c + 1]) of (the segment's first point in its chunk, as u (1) or w (0)), in
// point order.
struct Incidence {
  const int64_t* off;
  const int64_t* first;
  const bool* as_u;
};

// Backward, step 3: dU[r, c] += Σ over the tile's points with column c as an endpoint of
// their weight on it times Tg[r, q], in point order (the original c first).
template <typename T>
__global__ void du_kernel(Tabs<T> tb, Tile tl, Incidence inc, const T* __restrict__ tg,
                          T* __restrict__ du) {
  const int64_t r = tl.y0 + blockIdx.y, c = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (c >= tl.nc) return;
  const int64_t n = tb.n, q1 = tl.q0 + tl.nt;
  const T* t = tg + r * tl.nt;  // t[q − q0] for the chunk's point q in the tile
  T acc = du[r * tl.nc + c];
  if (c >= tl.q0 && c < q1) acc += t[c - tl.q0];
  for (int64_t e = inc.off[tl.c0 + c]; e < inc.off[tl.c0 + c + 1]; ++e) {
    const int64_t f = inc.first[e];
    if (f + n <= tl.q0 || f >= q1) continue;
    const bool as_u = inc.as_u[e];
    for (int64_t k = 1; k <= n; ++k) {
      const int64_t qi = f + k - 1;
      if (qi < tl.q0 || qi >= q1) continue;
      const T lam = tb.lam[k];
      acc += (as_u ? lam : T(1) - lam) * t[qi - tl.q0];
    }
  }
  du[r * tl.nc + c] = acc;
}

// Backward, step 4: ∂L/∂‖q‖ −= Σ_i w·ŝ / ‖q‖ for the tile's synthetic points (one writer each).
template <typename T>
__global__ void qnorm_kernel(Tabs<T> tb, Tile tl, const T* __restrict__ cw,
                             T* __restrict__ dnorm) {
  const int64_t q = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (q >= tl.nt) return;
  const int64_t pid = tb.ppid[tl.p0 + tl.q0 + q];
  if (pid < 0) return;
  T acc = 0;
  for (int64_t r = 0; r < tl.nr; ++r) acc += cw[r * tl.nt + q];
  if (acc != T(0)) dnorm[pid] -= acc / tb.nrm[pid];
}

// The anchor chunk's segments (in chunk order) with each one's place in its two anchors' A.
struct ChunkSegs {
  const int64_t* seg;
  const int64_t* su;  // per segment (global index): endpoints' slots
  const int64_t* sw;
  const int64_t* rank_u;  // its place in A_{u}'s and A_{w}'s segment lists
  const int64_t* rank_w;
  int64_t count;
};

// Backward, step 5: per synthetic side point of the anchor chunk, ∂L/∂‖a‖ −= Σ w·ŝ / ‖a‖ over
// the pairs it won, both anchors' partials in a fixed order (one writer per point).
template <typename T>
__global__ void side_fold_kernel(Tabs<T> tb, ChunkSegs cs, const int64_t* __restrict__ side_flat,
                                 int64_t r0, const T* __restrict__ spart, int64_t nqw,
                                 T* __restrict__ dnorm) {
  const int64_t t = (int64_t)blockIdx.x * kThreads + threadIdx.x, n = tb.n;
  if (t >= cs.count * n) return;
  const int64_t e = cs.seg[t / n], k = t % n + 1, base = side_flat[r0];
  const int64_t fu = side_flat[cs.su[e]] - base + 1 + cs.rank_u[e] * n + k - 1;
  const int64_t fw = side_flat[cs.sw[e]] - base + 1 + cs.rank_w[e] * n + k - 1;
  T acc = 0;
  for (int64_t j = 0; j < nqw; ++j) acc += spart[fu * nqw + j];
  for (int64_t j = 0; j < nqw; ++j) acc += spart[fw * nqw + j];
  const int64_t pid = e * n + k - 1;
  if (acc != T(0)) dnorm[pid] -= acc / tb.nrm[pid];
}

// Backward, triplet: ∂L/∂pos += the tile's per-warp partials, a thread per anchor row.
template <typename T>
__global__ void pos_fold_kernel(Positives<T> ps, const int64_t* __restrict__ pos_flat,
                                int64_t r0, int64_t nr, const T* __restrict__ ppart, int64_t nqw,
                                T* __restrict__ dpos) {
  const int64_t r = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (r >= nr) return;
  const int64_t s = r0 + r, base = pos_flat[s] - pos_flat[r0];
  for (int64_t j = 0; j < ps.np[s]; ++j) {
    T acc = 0;
    for (int64_t w = 0; w < nqw; ++w) acc += ppart[(base + j) * nqw + w];
    dpos[ps.off[s] + j] += acc;
  }
}

// The synthetic points' norms from their chunk's Gram block G (nr × nr), a thread per point.
template <typename T>
__global__ void norms_kernel(const T* __restrict__ G, int64_t nr, int64_t r0, ChunkSegs cs,
                             const T* __restrict__ lam, int64_t n, T* __restrict__ sq,
                             T* __restrict__ nrm) {
  const int64_t t = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (t >= cs.count * n) return;
  const int64_t e = cs.seg[t / n], k = t % n + 1;
  const int64_t u = cs.su[e] - r0, w = cs.sw[e] - r0;
  // ee_point_sq's λ(λ g_uu + μ g_uw) + μ(λ g_wu + μ g_ww), rounded as written (these norms
  // divide every s(a, q): the CPU op's bits keep its ties)
  const T l = lam[k], m = T(1) - l;
  const T v = add_rn(mul_rn(l, lin_rn(l, G[u * nr + u], m, G[u * nr + w])),
                     mul_rn(m, lin_rn(l, G[w * nr + u], m, G[w * nr + w])));
  const T tiny = std::numeric_limits<T>::min();
  sq[e * n + k - 1] = v;
  nrm[e * n + k - 1] = std::sqrt(v < tiny ? tiny : v);  // NaN stays NaN
}

// ‖p‖² = λ(λ g_uu + μ g_uw) + μ(λ g_wu + μ g_ww): per segment the coefficients of its
// endpoints' rows in ∂L/∂X̂ (0 where the norm was clamped).
template <typename T>
__global__ void seg_coef_kernel(const T* __restrict__ dnorm, const T* __restrict__ sq,
                                const T* __restrict__ nrm, const T* __restrict__ lam, int64_t S,
                                int64_t n, T* __restrict__ coef) {
  const int64_t e = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (e >= S) return;
  T cuu = 0, cuw = 0, cww = 0;
  for (int64_t k = 1; k <= n; ++k) {
    const int64_t p = e * n + k - 1;
    if (!(sq[p] >= std::numeric_limits<T>::min()) || dnorm[p] == T(0)) continue;
    const T l = lam[k], m = T(1) - l, dsq = dnorm[p] / (T(2) * nrm[p]);
    cuu += T(2) * l * l * dsq;
    cuw += T(2) * l * m * dsq;
    cww += T(2) * m * m * dsq;
  }
  coef[3 * e] = cuu, coef[3 * e + 1] = cuw, coef[3 * e + 2] = cww;
}

// ∂L/∂X̂ of the norms: a block per slot, threads over D, its segments in A's order.
template <typename T>
__global__ void norm_rows_kernel(Tabs<T> tb, const T* __restrict__ coef,
                                 const T* __restrict__ x, int64_t D, T* __restrict__ dx) {
  const int64_t s = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    T acc = dx[s * D + d];
    for (int64_t e = tb.side_off[s]; e < tb.side_off[s + 1]; ++e) {
      const int64_t g = tb.side_seg[e], u = tb.side_u[e], w = tb.side_w[e];
      const T xu = x[u * D + d], xw = x[w * D + d];
      if (u == s)
        acc += coef[3 * g] * xu + coef[3 * g + 1] * xw;
      else
        acc += coef[3 * g + 1] * xu + coef[3 * g + 2] * xw;
    }
    dx[s * D + d] = acc;
  }
}

// ---------------------------------------------------------------------------------------
// Host side

at::Tensor dev(const std::vector<int64_t>& v, const at::Device& d) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(d);
}
at::Tensor dev32(const std::vector<int64_t>& v, const at::Device& d) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(at::kInt).to(d);
}
at::Tensor devb(const std::vector<int64_t>& v, const at::Device& d) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(at::kBool).to(d);
}

// The layout's tables on the device (dtype-free part of Tabs) and what the host loops need.
struct Tables {
  EeLayout L;
  std::vector<int64_t> pstart;  // per chunk: its first point (chunk count + 1)
  std::vector<int64_t> sstart;  // per chunk: its first segment in chunk order
  std::vector<int64_t> side_flat_h;
  at::Tensor cls, cstart, amask, side_off, side_u, side_w, side_seg, pu, pw, pk, ppid, pcls,
      pok, inc_off, inc_first, inc_as_u, chunk_seg, seg_u, seg_w, rank_u, rank_w, side_flat,
      order;

  int64_t nchunks() const { return int64_t(L.chunk_cls.size()) - 1; }
  int64_t rows0(int64_t t) const { return L.cstart[L.chunk_cls[t]]; }
  int64_t rows(int64_t t) const { return L.cstart[L.chunk_cls[t + 1]] - rows0(t); }

  Tables(const at::Tensor& labels, const at::Tensor& seg_i, const at::Tensor& seg_j,
         const at::Tensor& amask_, const at::Tensor& nmask_, int64_t n, int64_t chunk,
         const at::Device& d)
      : L(make_layout(labels.cpu().contiguous(), seg_i.cpu().contiguous(),
                      seg_j.cpu().contiguous(), n, chunk)) {
    const int64_t B = L.B, S = L.S;
    const at::Tensor am = amask_.cpu(), nm = nmask_.cpu();
    const bool* amp = am.data_ptr<bool>();
    const bool* nmp = nm.data_ptr<bool>();
    std::vector<int64_t> vcls(B), vam(B), soff{0}, su, sw, sseg, rku(S), rkw(S);
    side_flat_h = {0};
    for (int64_t s = 0; s < B; ++s) {
      const int64_t i = L.order[s];
      vcls[s] = L.cls[i];
      vam[s] = amp[i];
      const auto& segs = L.of_anchor[i];
      for (int64_t g = 0; g < int64_t(segs.size()); ++g) {
        const int64_t e = segs[g];
        su.push_back(L.slot[L.si[e]]);
        sw.push_back(L.slot[L.sj[e]]);
        sseg.push_back(e);
        (L.si[e] == i ? rku : rkw)[e] = g;
      }
      soff.push_back(int64_t(su.size()));
      side_flat_h.push_back(side_flat_h.back() + 1 + int64_t(segs.size()) * n);
    }
    // points and the column incidence, chunk by chunk
    std::vector<int64_t> vpu, vpw, vpk, vpid, vpcls, vpok, cseg, seg_su(S), seg_sw(S);
    std::vector<std::vector<std::pair<int64_t, int64_t>>> inc(B);
    pstart = {0};
    sstart = {0};
    for (int64_t t = 0; t < nchunks(); ++t) {
      const int64_t r0 = rows0(t), nr = rows(t);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = L.order[r0 + r];
        vpu.push_back(r), vpw.push_back(r), vpk.push_back(0), vpid.push_back(-1);
        vpcls.push_back(L.cls[i]), vpok.push_back(nmp[i]);
      }
      int64_t f = nr;  // the chunk's next point
      for (int64_t c = L.chunk_cls[t]; c < L.chunk_cls[t + 1]; ++c)
        for (int64_t e : L.class_segs[c]) {
          const int64_t u = L.slot[L.si[e]], w = L.slot[L.sj[e]];
          seg_su[e] = u, seg_sw[e] = w;
          cseg.push_back(e);
          inc[u].push_back({f, 1});
          inc[w].push_back({f, 0});
          for (int64_t k = 1; k <= n; ++k) {
            vpu.push_back(u - r0), vpw.push_back(w - r0), vpk.push_back(k);
            vpid.push_back(e * n + k - 1), vpcls.push_back(c), vpok.push_back(1);
          }
          f += n;
        }
      pstart.push_back(int64_t(vpu.size()));
      sstart.push_back(int64_t(cseg.size()));
    }
    std::vector<int64_t> ioff{0}, ifirst, iu;
    for (int64_t s = 0; s < B; ++s) {
      for (const auto& fe : inc[s]) ifirst.push_back(fe.first), iu.push_back(fe.second);
      ioff.push_back(int64_t(ifirst.size()));
    }
    cls = dev32(vcls, d), cstart = dev(L.cstart, d), amask = devb(vam, d);
    side_off = dev(soff, d), side_u = dev(su, d), side_w = dev(sw, d), side_seg = dev(sseg, d);
    pu = dev32(vpu, d), pw = dev32(vpw, d), pk = dev32(vpk, d), ppid = dev(vpid, d);
    pcls = dev32(vpcls, d), pok = devb(vpok, d);
    inc_off = dev(ioff, d), inc_first = dev(ifirst, d), inc_as_u = devb(iu, d);
    chunk_seg = dev(cseg, d), seg_u = dev(seg_su, d), seg_w = dev(seg_sw, d);
    rank_u = dev(rku, d), rank_w = dev(rkw, d), side_flat = dev(side_flat_h, d);
    order = dev(L.order, d);
  }

  template <typename T>
  Tabs<T> tabs(const at::Tensor& lam, const at::Tensor& nrm) const {
    return {L.n,
            lam.data_ptr<T>(),
            nrm.data_ptr<T>(),
            cls.data_ptr<int32_t>(),
            cstart.data_ptr<int64_t>(),
            amask.data_ptr<bool>(),
            side_off.data_ptr<int64_t>(),
            side_u.data_ptr<int64_t>(),
            side_w.data_ptr<int64_t>(),
            side_seg.data_ptr<int64_t>(),
            pu.data_ptr<int32_t>(),
            pw.data_ptr<int32_t>(),
            pk.data_ptr<int32_t>(),
            ppid.data_ptr<int64_t>(),
            pcls.data_ptr<int32_t>(),
            pok.data_ptr<bool>()};
  }

  ChunkSegs chunk_segs(int64_t t) const {
    return {chunk_seg.data_ptr<int64_t>() + sstart[t],
            seg_u.data_ptr<int64_t>(),
            seg_w.data_ptr<int64_t>(),
            rank_u.data_ptr<int64_t>(),
            rank_w.data_ptr<int64_t>(),
            sstart[t + 1] - sstart[t]};
  }
};

unsigned blocks(int64_t count) { return unsigned((count + kThreads - 1) / kThreads); }

// One call's state for dtype T: the slot-ordered rows, λ table and the synthetic norms.
template <typename T>
struct EeRun {
  const Tables& tb;
  at::Tensor xo, lam, sq, nrm;
  int64_t tile;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  EeRun(const Tables& t, const at::Tensor& x, int64_t chunk) : tb(t) {
    const int64_t n = t.L.n;
    xo = x.index_select(0, t.order).contiguous();
    std::vector<T> l(n + 1);
    for (int64_t k = 0; k <= n; ++k) l[k] = ee_lambda<T>(k, n);
    lam = at::empty({n + 1}, x.options().device(at::kCPU));
    std::copy(l.begin(), l.end(), lam.data_ptr<T>());
    lam = lam.to(x.device());
    sq = at::zeros({t.L.S * n}, x.options());
    nrm = at::ones({t.L.S * n}, x.options());
    tile = std::max<int64_t>(4 * chunk, 32);  // as the CPU op's column tiles
    for (int64_t c = 0; c < t.nchunks(); ++c) {
      const ChunkSegs cs = t.chunk_segs(c);
      if (cs.count * n == 0) continue;
      const at::Tensor xc = xo.narrow(0, t.rows0(c), t.rows(c));
      const at::Tensor G = at::mm(xc, xc.t()).contiguous();
      norms_kernel<T><<<blocks(cs.count * n), kThreads, 0, stream>>>(
          G.data_ptr<T>(), t.rows(c), t.rows0(c), cs, lam.data_ptr<T>(), n, sq.data_ptr<T>(),
          nrm.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  Tabs<T> tabs() const { return tb.tabs<T>(lam, nrm); }

  // Points per tile of anchor chunk t1: `tile`, narrower where the chunk's rows (a large
  // class) would make the nr × tile buffers, or the backward's per-warp partials of
  // `partials` entries each, larger than their budgets; a multiple of 32 (whole warps).
  int64_t tile_for(int64_t t1, int64_t partials) const {
    int64_t w = std::min(tile, kTileEntries / tb.rows(t1));
    if (partials > 0) w = std::min(w, kPartials / partials * 32);
    return std::max<int64_t>(32, w / 32 * 32);
  }

  // visit(tile, U, t1) for every chunk pair and tile of the point chunk's points (tiles of
  // at most tile_of(t1) points); after_pair(t1, t2, U) once a pair's tiles are done.
  template <class Visit, class After, class TileOf>
  void sweep(Visit&& visit, After&& after_pair, TileOf&& tile_of) const {
    for (int64_t t1 = 0; t1 < tb.nchunks(); ++t1) {
      const int64_t r0 = tb.rows0(t1), nr = tb.rows(t1);
      for (int64_t t2 = 0; t2 < tb.nchunks(); ++t2) {
        const int64_t c0 = tb.rows0(t2), nc = tb.rows(t2);
        const at::Tensor U =
            at::mm(xo.narrow(0, r0, nr), xo.narrow(0, c0, nc).t()).contiguous();
        const int64_t P = tb.pstart[t2 + 1] - tb.pstart[t2], w = tile_of(t1);
        for (int64_t q0 = 0; q0 < P; q0 += w)
          visit(Tile{r0, nr, c0, nc, tb.pstart[t2], q0, std::min(w, P - q0), 0}, U, t1);
        after_pair(t1, t2, U);
      }
    }
  }
};

void check_ee_cuda(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& seg_i,
                   const at::Tensor& seg_j, const at::Tensor& anchor_mask,
                   const at::Tensor& neg_mask, int64_t n, int64_t chunk) {
  check_ee_args(x, labels, seg_i, seg_j, anchor_mask, neg_mask, n, chunk);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  for (const at::Tensor* t : {&labels, &seg_i, &seg_j, &anchor_mask, &neg_mask})
    TORCH_CHECK(t->device() == x.device(), "ee ops: every input must be on x's device (",
                x.device(), "), got ", t->device());
}

at::Tensor unslot(const Tables& tb, const at::Tensor& vo) {
  at::Tensor out = at::empty_like(vo);
  out.index_copy_(0, tb.order, vo);
  return out;
}

at::Tensor ee_neg_lse_fwd_cuda(const at::Tensor& x_, const at::Tensor& labels,
                               const at::Tensor& seg_i, const at::Tensor& seg_j,
                               const at::Tensor& anchor_mask, const at::Tensor& neg_mask,
                               int64_t n, bool l2, double scale, double offset, int64_t chunk) {
  check_ee_cuda(x_, labels, seg_i, seg_j, anchor_mask, neg_mask, n, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const Tables tb(labels, seg_i, seg_j, anchor_mask, neg_mask, n, chunk, x.device());
  at::Tensor lse = at::full({tb.L.B}, -std::numeric_limits<double>::infinity(), x.options());
  if (tb.L.B == 0) return lse;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_neg_lse_fwd_cuda", [&] {
    using T = scalar_t;
    const EeRun<T> run(tb, x, chunk);
    const Tabs<T> tabs = run.tabs();
    run.sweep(
        [&](const Tile& tl, const at::Tensor& U, int64_t) {
          at::Tensor val = at::empty({tl.nr, tl.nt}, x.options());
          over_rows(tl, [&](const Tile& t, unsigned ny) {
            lse_terms_kernel<T><<<dim3(blocks(t.nt), ny), kThreads, 0, run.stream>>>(
                tabs, t, U.data_ptr<T>(), l2, T(scale), T(offset), val.data_ptr<T>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
          at::Tensor rows = lse.narrow(0, tl.r0, tl.nr);
          rows.copy_(at::logaddexp(rows, at::logsumexp(val, {1})));
        },
        [](int64_t, int64_t, const at::Tensor&) {}, [&](int64_t t1) { return run.tile_for(t1, 0); });
  });
  return unslot(tb, lse);
}

// Per anchor (in slot order): its first positive in `pos` (anchors in index order) and count.
struct PosLayout {
  std::vector<int64_t> flat;  // per slot: cumulative count (B + 1)
  at::Tensor off, np, flat_d;
  PosLayout(const Tables& tb, const at::Device& d) {
    const EeLayout& L = tb.L;
    const std::vector<int64_t> po = pos_offsets(L);
    std::vector<int64_t> off_s(L.B), np_s(L.B);
    flat = {0};
    for (int64_t s = 0; s < L.B; ++s) {
      const int64_t i = L.order[s];
      off_s[s] = po[i], np_s[s] = po[i + 1] - po[i];
      flat.push_back(flat.back() + np_s[s]);
    }
    off = dev(off_s, d), np = dev32(np_s, d), flat_d = dev(flat, d);
  }
  template <typename T>
  Positives<T> positives(const at::Tensor& pos, double margin, bool smooth) const {
    return {pos.data_ptr<T>(), off.data_ptr<int64_t>(), np.data_ptr<int32_t>(), T(margin),
            smooth};
  }
};

// The backward shared by both losses: ∂L/∂X̂ (caller's order), ∂L/∂pos into dpos (TRIP, with
// the positives' layout pl).
template <typename T, bool TRIP>
at::Tensor ee_backward(const Tables& tb, const at::Tensor& x, int64_t chunk, bool l2,
                       const Upstream<T>& up, const Positives<T>& ps, const PosLayout* pl,
                       at::Tensor* dpos) {
  const EeRun<T> run(tb, x, chunk);
  const Tabs<T> tabs = run.tabs();
  const at::Tensor &xo = run.xo, &sq = run.sq, &nrm = run.nrm, &lam = run.lam;
  const int64_t n = tb.L.n, D = x.size(1);
  at::Tensor dxo = at::zeros_like(xo);
  at::Tensor dnorm = at::zeros({tb.L.S * n}, x.options());
  const Incidence inc{tb.inc_off.data_ptr<int64_t>(), tb.inc_first.data_ptr<int64_t>(),
                      tb.inc_as_u.data_ptr<bool>()};
  at::Tensor dU;  // ∂L/∂U of the current chunk pair, over its tiles
  run.sweep(
      [&](const Tile& tl, const at::Tensor& U, int64_t t1) {
        if (tl.q0 == 0) dU = at::zeros({tl.nr, tl.nc}, x.options());
        const auto opt = x.options();
        const int64_t nqw = (tl.nt + 31) / 32;
        const int64_t nside = tb.side_flat_h[tl.r0 + tl.nr] - tb.side_flat_h[tl.r0];
        at::Tensor wn = at::empty({tl.nr, tl.nt}, opt), cw = at::empty({tl.nr, tl.nt}, opt);
        at::Tensor arg = at::empty({tl.nr, tl.nt}, opt.dtype(at::kInt));
        at::Tensor spart = at::zeros({nside * nqw}, opt), ppart;
        Grads<T> gr{wn.data_ptr<T>(), arg.data_ptr<int32_t>(), cw.data_ptr<T>(),
                    spart.data_ptr<T>(), nullptr, tb.side_flat.data_ptr<int64_t>(),
                    nullptr, nqw};
        if constexpr (TRIP) {
          ppart = at::empty({(pl->flat[tl.r0 + tl.nr] - pl->flat[tl.r0]) * nqw}, opt);
          gr.ppart = ppart.data_ptr<T>();
          gr.pos_flat = pl->flat_d.data_ptr<int64_t>();
        }
        at::Tensor tg = at::empty({tl.nr, tl.nt}, opt);
        over_rows(tl, [&](const Tile& t, unsigned ny) {
          weights_kernel<T, TRIP><<<dim3(blocks(t.nt), ny), kThreads, 0, run.stream>>>(
              tabs, t, U.data_ptr<T>(), l2, up, ps, gr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        over_rows(tl, [&](const Tile& t, unsigned ny) {  // after every row's weights
          tg_kernel<T><<<dim3(blocks(t.nt), ny), kThreads, 0, run.stream>>>(
              tabs, t, wn.data_ptr<T>(), arg.data_ptr<int32_t>(), tg.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        over_rows(tl, [&](const Tile& t, unsigned ny) {
          du_kernel<T><<<dim3(blocks(t.nc), ny), kThreads, 0, run.stream>>>(
              tabs, t, inc, tg.data_ptr<T>(), dU.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        qnorm_kernel<T><<<blocks(tl.nt), kThreads, 0, run.stream>>>(tabs, tl, cw.data_ptr<T>(),
                                                                   dnorm.data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        const ChunkSegs cs = tb.chunk_segs(t1);
        if (cs.count * n > 0) {
          side_fold_kernel<T><<<blocks(cs.count * n), kThreads, 0, run.stream>>>(
              tabs, cs, tb.side_flat.data_ptr<int64_t>(), tl.r0, spart.data_ptr<T>(), nqw,
              dnorm.data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if constexpr (TRIP) {
          pos_fold_kernel<T><<<blocks(tl.nr), kThreads, 0, run.stream>>>(
              ps, pl->flat_d.data_ptr<int64_t>(), tl.r0, tl.nr, ppart.data_ptr<T>(), nqw,
              dpos->data_ptr<T>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      },
      [&](int64_t t1, int64_t t2, const at::Tensor&) {
        // dX̂ = ∂L/∂U X̂ + ∂L/∂Uᵀ X̂ over this block of G, as the CPU op
        const int64_t r0 = tb.rows0(t1), nr = tb.rows(t1), c0 = tb.rows0(t2), nc = tb.rows(t2);
        dxo.narrow(0, r0, nr).addmm_(dU, xo.narrow(0, c0, nc));
        dxo.narrow(0, c0, nc).addmm_(dU.t(), xo.narrow(0, r0, nr));
        dU = at::Tensor();
      },
      [&](int64_t t1) {  // the per-warp partials of A_i's entries (and the positives') too
        const int64_t r0 = tb.rows0(t1), r1 = r0 + tb.rows(t1);
        int64_t entries = tb.side_flat_h[r1] - tb.side_flat_h[r0];
        if (TRIP) entries += pl->flat[r1] - pl->flat[r0];
        return run.tile_for(t1, entries);
      });
  if (tb.L.S * n > 0) {
    at::Tensor coef = at::empty({3 * tb.L.S}, x.options());
    seg_coef_kernel<T><<<blocks(tb.L.S), kThreads, 0, run.stream>>>(
        dnorm.data_ptr<T>(), sq.data_ptr<T>(), nrm.data_ptr<T>(), lam.data_ptr<T>(),
        tb.L.S, n, coef.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    norm_rows_kernel<T><<<unsigned(tb.L.B), 128, 0, run.stream>>>(
        tabs, coef.data_ptr<T>(), xo.data_ptr<T>(), D, dxo.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return unslot(tb, dxo);
}

at::Tensor ee_neg_lse_bwd_cuda(const at::Tensor& grad, const at::Tensor& lse,
                               const at::Tensor& x_, const at::Tensor& labels,
                               const at::Tensor& seg_i, const at::Tensor& seg_j,
                               const at::Tensor& anchor_mask, const at::Tensor& neg_mask,
                               int64_t n, bool l2, double scale, double offset, int64_t chunk) {
  check_ee_cuda(x_, labels, seg_i, seg_j, anchor_mask, neg_mask, n, chunk);
  check_row_vec(grad, x_, "grad");
  check_row_vec(lse, x_, "lse");
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const Tables tb(labels, seg_i, seg_j, anchor_mask, neg_mask, n, chunk, x.device());
  if (tb.L.B == 0) return at::zeros_like(x);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_neg_lse_bwd_cuda", [&] {
    using T = scalar_t;
    const at::Tensor g = grad.to(x.scalar_type()).index_select(0, tb.order).contiguous();
    const at::Tensor ls = lse.to(x.scalar_type()).index_select(0, tb.order).contiguous();
    const at::Tensor act =
        tb.amask.logical_and(g.ne(0)).logical_and(ls.ne(-std::numeric_limits<T>::infinity()));
    const Upstream<T> up{g.data_ptr<T>(), act.data_ptr<bool>(), ls.data_ptr<T>(), T(scale),
                         T(offset)};
    const Positives<T> none{nullptr, nullptr, nullptr, T(0), false};
    out = ee_backward<T, false>(tb, x, chunk, l2, up, none, nullptr, nullptr);
  });
  return out;
}

// The triplet ops' inputs, checked (every anchor computed, every original a negative), x and
// pos contiguous, and the call's tables.
at::Tensor all_rows(const at::Tensor& x, const at::Tensor& labels) {
  return at::ones({x.dim() > 0 ? x.size(0) : 0}, labels.options().dtype(at::kBool));
}

struct TripletCall {
  at::Tensor all, x, pos;
  Tables tb;
  TripletCall(const at::Tensor& x_, const at::Tensor& labels, const at::Tensor& seg_i,
              const at::Tensor& seg_j, const at::Tensor& pos_, int64_t n, int64_t chunk)
      : all(all_rows(x_, labels)),
        x((check_ee_cuda(x_, labels, seg_i, seg_j, all, all, n, chunk), x_.contiguous())),
        pos(pos_.contiguous()),
        tb(labels, seg_i, seg_j, all, all, n, chunk, x.device()) {
    TORCH_CHECK(pos.device() == x.device(), "pos must be on x's device (", x.device(),
                "), got ", pos.device());
    check_pos(tb.L, pos, x);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> ee_triplet_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& labels, const at::Tensor& seg_i,
    const at::Tensor& seg_j, const at::Tensor& pos_, int64_t n, bool l2, double margin,
    bool smooth, int64_t chunk) {
  const TripletCall call(x_, labels, seg_i, seg_j, pos_, n, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor &x = call.x, &pos = call.pos;
  const Tables& tb = call.tb;
  const int64_t B = tb.L.B;
  at::Tensor sums = at::zeros({B}, x.options());
  at::Tensor nonzero = at::zeros({B}, labels.options()), count = at::zeros({B}, labels.options());
  if (B == 0) return {sums, nonzero, count};
  const PosLayout pl(tb, x.device());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_triplet_fwd_cuda", [&] {
    using T = scalar_t;
    const EeRun<T> run(tb, x, chunk);
    const Tabs<T> tabs = run.tabs();
    const Positives<T> ps = pl.positives<T>(pos, margin, smooth);
    const at::Tensor np = pl.np.to(at::kLong);
    run.sweep(
        [&](const Tile& tl, const at::Tensor& U, int64_t) {
          at::Tensor f = at::empty({tl.nr, tl.nt}, x.options());
          at::Tensor k = at::empty({tl.nr, tl.nt}, x.options().dtype(at::kInt));
          over_rows(tl, [&](const Tile& t, unsigned ny) {
            trip_terms_kernel<T><<<dim3(blocks(t.nt), ny), kThreads, 0, run.stream>>>(
                tabs, t, U.data_ptr<T>(), l2, ps, f.data_ptr<T>(), k.data_ptr<int32_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
          sums.narrow(0, tl.r0, tl.nr).add_(f.sum(1));
          nonzero.narrow(0, tl.r0, tl.nr).add_(k.clamp_min(0).sum({1}, false, at::kLong));
          count.narrow(0, tl.r0, tl.nr)
              .add_(k.ge(0).sum({1}, false, at::kLong) * np.narrow(0, tl.r0, tl.nr));
        },
        [](int64_t, int64_t, const at::Tensor&) {}, [&](int64_t t1) { return run.tile_for(t1, 0); });
  });
  return {unslot(tb, sums), unslot(tb, nonzero), unslot(tb, count)};
}

std::tuple<at::Tensor, at::Tensor> ee_triplet_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x_, const at::Tensor& labels,
    const at::Tensor& seg_i, const at::Tensor& seg_j, const at::Tensor& pos_, int64_t n,
    bool l2, double margin, bool smooth, int64_t chunk) {
  const TripletCall call(x_, labels, seg_i, seg_j, pos_, n, chunk);
  check_row_vec(grad, x_, "grad");
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor &x = call.x, &pos = call.pos;
  const Tables& tb = call.tb;
  at::Tensor dpos = at::zeros_like(pos);
  if (tb.L.B == 0) return {at::zeros_like(x), dpos};
  const PosLayout pl(tb, x.device());
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_triplet_bwd_cuda", [&] {
    using T = scalar_t;
    const at::Tensor g = grad.to(x.scalar_type()).index_select(0, tb.order).contiguous();
    const at::Tensor act = g.ne(0).logical_and(pl.np.gt(0)).contiguous();
    const Upstream<T> up{g.data_ptr<T>(), act.data_ptr<bool>(), nullptr, T(1), T(0)};
    dx = ee_backward<T, true>(tb, x, chunk, l2, up, pl.positives<T>(pos, margin, smooth), &pl,
                              &dpos);
  });
  return {dx, dpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("ee_neg_lse_fwd", &ee_neg_lse_fwd_cuda);
  m.impl("ee_neg_lse_bwd", &ee_neg_lse_bwd_cuda);
  m.impl("ee_triplet_fwd", &ee_triplet_fwd_cuda);
  m.impl("ee_triplet_bwd", &ee_triplet_bwd_cuda);
}

}  // namespace metrix_ops
