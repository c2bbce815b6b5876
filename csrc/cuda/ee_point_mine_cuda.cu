// Embedding Expansion's hard-negative mining for HPHNTripletLoss on the CUDA engine: per point p
// of the expansion (reference/expansion_points.py: the B originals, then n synthetic points per
// segment, segment-major), its closest point q of another class in the loss's metric (the
// largest cosine, or the smallest √(2 − 2s) with cdist's 0 below 16 eps), ties to the lowest
// q. The same contract as the Triton engine's triton_ee_point_mine; the per-anchor picks over
// its side are then PyTorch (fused/ee_hphn_picks.py). No gradient: the loss recomputes the
// chosen distances with gradient.
//
// The points are never materialised: a point is (u, w, λ), and its inner product with q is
// the reference's association (PointMetric: H_bq = λ_q G_{b u_q} + (1−λ_q) G_{b w_q}, then
// ⟨p, q⟩ = λ_p H_{u_p q} + (1−λ_p) H_{w_p q}, over ‖p‖‖q‖). The n points of a segment share
// their endpoints, so they are mined together: a row "unit" is an original, or up to kUnit
// points of one segment. Per chunk of units two cuBLAS products hold the Gram rows of their
// endpoints (Gu = X[u] Xᵀ, Gw = X[w] Xᵀ); a warp per unit, lanes over the column units (an
// original, or a whole segment: twenty-sixth session, before lanes went over column points):
// four Gram entries per (row unit, column unit), then per column point its λ and norm and a
// few FMAs per point of the row unit. Memory O(P + chunk·B); no P×D stack, no P×P matrix.
// Work: 4 Gram gathers per pair of units, (B + S·⌈n/kUnit⌉)·(B + S) of them for S segments,
// and P² point pairs; no pruning (the CPU op skips classes and arcs on bounds).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include "common/op_tags.h"

namespace metrix_ops {
namespace {

constexpr int kUnit = 8;  // points of one segment mined by one warp
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

// The row unit's points: unit t < B is original t; then ⌈n/kUnit⌉ units per segment. The
// column units are the B originals and the S whole segments.
struct Units {
  int64_t B, n, groups, S;  // groups: row units per segment
  __device__ __forceinline__ void of(int64_t t, int64_t& p0, int& cnt) const {
    if (t < B) {
      p0 = t;
      cnt = 1;
      return;
    }
    const int64_t seg = (t - B) / groups, grp = (t - B) % groups;
    p0 = B + seg * n + grp * kUnit;
    cnt = (int)std::min<int64_t>(kUnit, n - grp * kUnit);
  }
};

template <typename T>
struct Points {
  const int64_t* u;
  const int64_t* w;
  const int64_t* label;
  const T* lam;
  const T* scale;  // ‖point‖ (originals exactly 1)
  int64_t P;
};

// q beats the kept (best, col): strictly closer, or as close at a lower column; a kept
// col == P is "none yet"
template <typename T>
__device__ __forceinline__ bool beats(T m, int64_t q, T best, int64_t col, bool inverted,
                                      int64_t P) {
  if (q >= P) return false;
  if (col == P) return true;
  if (inverted ? m > best : m < best) return true;
  return m == best && q < col;
}

// Warp t of the chunk [t0, t0 + T): its unit's closest other-class point per point
template <typename T>
__global__ void point_mine_kernel(const T* __restrict__ Gu, const T* __restrict__ Gw,
                                  int64_t t0, int64_t T_, Units units, Points<T> pts,
                                  bool inverted, T tiny, T eps, T* __restrict__ best_out,
                                  int64_t* __restrict__ col_out) {
  const int64_t t = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= T_) return;  // the whole warp
  int64_t p0;
  int cnt;
  units.of(t0 + t, p0, cnt);
  const int64_t B = units.B, P = pts.P, lab = pts.label[p0];
  const T* gu = Gu + t * B;
  const T* gw = Gw + t * B;
  T lam[kUnit], sc[kUnit], best[kUnit];
  int64_t col[kUnit];
#pragma unroll
  for (int k = 0; k < kUnit; ++k) {
    lam[k] = k < cnt ? pts.lam[p0 + k] : T(1);
    sc[k] = k < cnt ? pts.scale[p0 + k] : T(1);
    best[k] = T(0);
    col[k] = P;
  }
  for (int64_t c = lane; c < B + units.S; c += 32) {
    // column unit c: original c, or segment c − B's n points (their endpoints and label are
    // the first's: the host checks the runs)
    const int64_t q0 = c < B ? c : B + (c - B) * units.n;
    if (pts.label[q0] == lab) continue;
    const int64_t uq = pts.u[q0], wq = pts.w[q0], q1 = c < B ? q0 + 1 : q0 + units.n;
    const T g_uu = gu[uq], g_uw = gu[wq], g_wu = gw[uq], g_ww = gw[wq];
    for (int64_t q = q0; q < q1; ++q) {
      const T lq = pts.lam[q], sq = pts.scale[q];
      const T h_u = lq * g_uu + (T(1) - lq) * g_uw;
      const T h_w = lq * g_wu + (T(1) - lq) * g_ww;
#pragma unroll
      for (int k = 0; k < kUnit; ++k) {
        if (k >= cnt) break;
        const T s = (lam[k] * h_u + (T(1) - lam[k]) * h_w) / (sc[k] * sq);
        T m = s;
        if (!inverted) {
          const T d2 = T(2) - T(2) * s;
          m = d2 < tiny ? T(0) : std::sqrt(d2 > eps ? d2 : eps);
        }
        if (beats(m, q, best[k], col[k], inverted, P)) {  // columns rise along a lane
          best[k] = m;
          col[k] = q;
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kUnit; ++k) {
    for (int off = 16; off > 0; off >>= 1) {  // every lane shuffles (full mask)
      const T ob = __shfl_down_sync(0xffffffffu, best[k], off);
      const int64_t oc = __shfl_down_sync(0xffffffffu, col[k], off);
      if (lane < off && beats(ob, oc, best[k], col[k], inverted, P)) {
        best[k] = ob;
        col[k] = oc;
      }
    }
    if (lane == 0 && k < cnt) {  // no other-class point: ∓inf and −1, as the Triton kernel
      const T none = inverted ? -std::numeric_limits<T>::infinity()
                              : std::numeric_limits<T>::infinity();
      best_out[p0 + k] = col[k] < P ? best[k] : none;
      col_out[p0 + k] = col[k] < P ? col[k] : -1;
    }
  }
}

void check_table(const at::Tensor& t, int64_t P, at::ScalarType dt, const at::Tensor& x,
                 const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == P, name, " must be 1-D of length ", P, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
}

// A segment's n points share their endpoints and label (the kernel reads them from the first)
void check_runs(const at::Tensor& t, int64_t B, int64_t S, int64_t n, const char* name) {
  if (S == 0 || n <= 1) return;
  const at::Tensor runs = t.narrow(0, B, S * n).view({S, n});
  TORCH_CHECK(runs.eq(runs.select(1, 0).unsqueeze(1)).all().item<bool>(), name,
              ": the n points of each segment must share it (the B originals first, then n "
              "points per segment)");
}

std::tuple<at::Tensor, at::Tensor> ee_point_mine_cuda(
    const at::Tensor& x_, const at::Tensor& pu, const at::Tensor& pw, const at::Tensor& plam,
    const at::Tensor& pscale, const at::Tensor& plab, int64_t n_points, bool inverted,
    int64_t chunk) {
  TORCH_CHECK(x_.dim() == 2, "x must be 2-D (B, D), got ", x_.dim(), "-D");
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble,
              "x must be float32 or float64, got ", x_.scalar_type());
  TORCH_CHECK(x_.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x_.device());
  TORCH_CHECK(n_points >= 0, "n_points must be >= 0, got ", n_points);
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
  const int64_t B = x_.size(0), P = pu.dim() == 1 ? pu.size(0) : -1;
  TORCH_CHECK(P >= B && (P == B || (n_points > 0 && (P - B) % n_points == 0)),
              "the point tables must hold the B = ", B, " originals, then n_points = ", n_points,
              " points per segment; got ", P, " points");
  check_table(pu, P, at::kLong, x_, "pu");
  check_table(pw, P, at::kLong, x_, "pw");
  check_table(plab, P, at::kLong, x_, "plab");
  check_table(plam, P, x_.scalar_type(), x_, "plam");
  check_table(pscale, P, x_.scalar_type(), x_, "pscale");
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor best = at::empty({P}, x_.options()), col = at::full({P}, -1, pu.options());
  if (P == 0) return {best, col};
  TORCH_CHECK(pu.min().item<int64_t>() >= 0 && pu.max().item<int64_t>() < B &&
                  pw.min().item<int64_t>() >= 0 && pw.max().item<int64_t>() < B,
              "pu and pw must be rows of x, in [0, ", B, ")");
  const int64_t S = n_points > 0 ? (P - B) / n_points : 0;
  check_runs(pu, B, S, n_points, "pu");
  check_runs(pw, B, S, n_points, "pw");
  check_runs(plab, B, S, n_points, "plab");
  // EE's segments are positive pairs (checked here, where a compiled module cannot check
  // pairs="adjacent" before the op, as the CPU op does)
  const at::Tensor ends = plab.narrow(0, 0, B);
  TORCH_CHECK(ends.index_select(0, pu).eq(ends.index_select(0, pw)).all().item<bool>(),
              "each segment's ends (pu, pw) must be rows of one label: Embedding Expansion's "
              "segments are positive pairs, not rows of different labels (with "
              "pairs='adjacent', rows 2t and 2t+1 of a class-contiguous batch)");
  auto x = x_.contiguous();
  auto u = pu.contiguous(), w = pw.contiguous(), lab = plab.contiguous();
  auto lam = plam.contiguous(), scale = pscale.contiguous();
  const int64_t groups = (n_points + kUnit - 1) / kUnit, U = B + S * groups;
  // each unit's first point, then its endpoints (the rows of its two Gram blocks)
  const auto iopt = pu.options();
  at::Tensor first = at::arange(B, iopt);
  if (S > 0)
    first = at::cat({first, B + at::arange(S, iopt).repeat_interleave(groups) * n_points +
                                at::arange(groups, iopt).repeat({S}) * kUnit});
  const at::Tensor unit_u = u.index_select(0, first), unit_w = w.index_select(0, first);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ee_point_mine_cuda", [&] {
    using T = scalar_t;
    const T eps = std::numeric_limits<T>::epsilon();
    const Points<T> pts{u.data_ptr<int64_t>(), w.data_ptr<int64_t>(), lab.data_ptr<int64_t>(),
                        lam.data_ptr<T>(), scale.data_ptr<T>(), P};
    const Units units{B, n_points, std::max<int64_t>(groups, 1), S};
    auto stream = c10::cuda::getCurrentCUDAStream();
    for (int64_t t0 = 0; t0 < U; t0 += chunk) {
      const int64_t T_ = std::min(chunk, U - t0);
      auto gram = [&](const at::Tensor& rows) {
        return at::mm(x.index_select(0, rows.narrow(0, t0, T_)), x.t()).contiguous();
      };
      const at::Tensor gu = gram(unit_u), gw = gram(unit_w);
      point_mine_kernel<T><<<(unsigned)((T_ + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
          gu.data_ptr<T>(), gw.data_ptr<T>(), t0, T_, units, pts, inverted, T(16) * eps, eps,
          best.data_ptr<T>(), col.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {best, col};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Per point of an EE point table (pu, pw, plam: the point λ·x_u + (1−λ)·x_w of unit rows x;
  // pscale its norm; plab its label; the B originals first, then n_points per segment): the
  // largest cosine (inverted) or smallest distance to a point of another label, and that
  // point (−1: none), ties to the lowest. Gram rows `chunk` units at a time. No gradient.
  m.def("ee_point_mine(Tensor x, Tensor pu, Tensor pw, Tensor plam, Tensor pscale, "
        "Tensor plab, int n_points, bool inverted, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) { m.impl("ee_point_mine", &ee_point_mine_cuda); }

}  // namespace metrix_ops
