// The distances HPHN triplet's picks need, with their gradient, from the mined indices
// (ee_hphn_mine, or the Triton mining kernel) and the unit rows x̂, in O(B) extra memory.
//
// Per anchor b the picks are [p, a_u, a_w, a_k, q_u, q_w, q_k] (−1: none; such a row
// computes a throw-away value from row 0, as the Python glue did): its farthest positive p,
// and its closest pair of points a = lerp(x̂_aw, x̂_au, λa), q = lerp(x̂_qw, x̂_qu, λq) with
// λ = k/(n+1) (originals: u = w, λ = 1, the row itself). The op returns
//   pos[b]  = x̂_b · x̂_p            (cosine)  or  ‖x̂_b − x̂_p‖²  (L2, exact for duplicates),
//   s_an[b] = a · q / (‖a‖ ‖q‖)     with ‖·‖ = 1 exactly for an original,
// and the caller takes the square roots (safe_sqrt) on these B values.
//
// Why an op: the same values from gathered B×D rows in PyTorch (index_select, lerp, three
// products, and their backward: index_add, mul, …) made a dozen fresh B×D tensors per call,
// whose first-touch page faults and passes cost more than the mining's Gram product at
// B = 4096, D = 512. Here the forward reads six rows per anchor in place, and the backward
// writes dx̂ once: every row's gradient is a weighted sum of a few rows of x̂ (the chain rule
// through the dot, the norms and the lerps), listed as (destination, source, weight) entries
// and summed per destination row by one thread (row_gather.h: reproducible, no atomics).
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/op_checks.h"
#include "cpu/row_gather.h"

namespace metrix_ops {
namespace {

constexpr int64_t kCols = 7;

void check_pick_inputs(const at::Tensor& xu, const at::Tensor& idx, int64_t n) {
  TORCH_CHECK(xu.dim() == 2, "xu must be 2-D (B, D), got ", xu.dim(), "-D");
  TORCH_CHECK(xu.scalar_type() == at::kFloat || xu.scalar_type() == at::kDouble,
              "xu must be float32 or float64 (half inputs are upcast before the op), got ",
              xu.scalar_type());
  TORCH_CHECK(xu.device().is_cpu() && idx.device().is_cpu(),
              "hphn_pick_sims: xu and idx must be CPU tensors");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == xu.size(0) && idx.size(1) == kCols &&
                  idx.scalar_type() == at::kLong,
              "idx must be int64 of shape (", xu.size(0), ", 7), got ", idx.sizes(), " ",
              idx.scalar_type());
  TORCH_CHECK(n >= 0, "n_points must be >= 0, got ", n);
}

// The picks of one anchor, with −1 (none) read as row 0 and λ in the loss dtype.
template <typename T>
struct Pick {
  int64_t p, au, aw, qu, qw;
  T la, lq;
};

// λ = k/(n+1) on the reference's float64 grid, then the loss dtype (originals: exactly 1)
template <typename T>
T pick_lambda(int64_t k, int64_t n) {
  return T(double(k < 0 ? 0 : k) / double(n + 1));
}

template <typename T>
std::vector<Pick<T>> read_picks(const at::Tensor& idx, int64_t B, int64_t n) {
  const int64_t* q = idx.data_ptr<int64_t>();
  std::vector<Pick<T>> out(B);
  auto row = [&](int64_t v, int64_t b, const char* col) {
    TORCH_CHECK(v >= -1 && v < B, "idx[", b, ", ", col, "] must be in [-1, ", B, "), got ", v);
    return v < 0 ? int64_t(0) : v;
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* r = q + b * kCols;
    for (int c : {3, 6})
      TORCH_CHECK(r[c] >= -1 && r[c] <= n + 1, "idx[", b, ", ", c, "] (a point's k) must be in [-1, ",
                  n + 1, "], got ", r[c]);
    out[b] = {row(r[0], b, "0"), row(r[1], b, "1"), row(r[2], b, "2"), row(r[4], b, "4"),
              row(r[5], b, "5"), pick_lambda<T>(r[3], n), pick_lambda<T>(r[6], n)};
  }
  return out;
}

// out = lerp(w, u, λ), torch.lerp's formula (exact at λ = 1: u itself)
template <typename T>
void lerp_row(T* __restrict out, const T* __restrict w, const T* __restrict u, T lam,
              int64_t D) {
  if (std::abs(lam) < T(0.5)) {
    for (int64_t d = 0; d < D; ++d) out[d] = w[d] + lam * (u[d] - w[d]);
  } else {
    const T rest = T(1) - lam;
    for (int64_t d = 0; d < D; ++d) out[d] = u[d] - (u[d] - w[d]) * rest;
  }
}

// The closest pair's cosine and the pieces its gradient needs.
template <typename T>
struct PairCos {
  T s;       // a · q / (‖a‖ ‖q‖)
  T inv;     // 1 / (‖a‖ ‖q‖)
  T ca, cq;  // s / ‖a‖², s / ‖q‖² where the norm is differentiated (0: an original, or clamped)
};

// ‖v‖ from ‖v‖² as the Python glue: 1 exactly for an original, else √max(‖v‖², tiny), whose
// gradient is 0 where the clamp is active (clamp_min's)
template <typename T>
void point_norm(T sq, bool original, T& norm, bool& differentiated) {
  const T tiny = std::numeric_limits<T>::min();
  differentiated = !original && sq >= tiny;
  norm = original ? T(1) : std::sqrt(sq < tiny ? tiny : sq);
}

template <typename T>
PairCos<T> pair_cos(const T* xu, const Pick<T>& k, int64_t D, T* a, T* q) {
  lerp_row(a, xu + k.aw * D, xu + k.au * D, k.la, D);
  lerp_row(q, xu + k.qw * D, xu + k.qu * D, k.lq, D);
  T na, nq;
  bool da, dq;
  point_norm(row_dot(a, a, D), k.au == k.aw, na, da);
  point_norm(row_dot(q, q, D), k.qu == k.qw, nq, dq);
  const T inv = T(1) / (na * nq);
  const T s = row_dot(a, q, D) / (na * nq);
  return {s, inv, da ? s / (na * na) : T(0), dq ? s / (nq * nq) : T(0)};
}

template <typename T>
T pos_value(const T* xu, int64_t b, int64_t p, int64_t D, bool l2, T* diff) {
  const T* x = xu + b * D;
  const T* y = xu + p * D;
  if (!l2) return row_dot(x, y, D);
  for (int64_t d = 0; d < D; ++d) diff[d] = x[d] - y[d];
  return row_dot(diff, diff, D);
}

// anchors per parallel task: about 32k multiply-adds of row work
inline int64_t pick_grain(int64_t D) { return std::max<int64_t>(1, pair_grain(D) / 6); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> hphn_pick_sims_cpu(const at::Tensor& xu_, const at::Tensor& idx_,
                                                      int64_t n, bool l2_pos) {
  check_pick_inputs(xu_, idx_, n);
  auto xu = xu_.contiguous();
  auto idx = idx_.contiguous();
  const int64_t B = xu.size(0), D = xu.size(1);
  at::Tensor pos = at::empty({B}, xu.options()), san = at::empty({B}, xu.options());
  AT_DISPATCH_FLOATING_TYPES(xu.scalar_type(), "hphn_pick_sims_cpu", [&] {
    using T = scalar_t;
    const auto picks = read_picks<T>(idx, B, n);
    const T* x = xu.data_ptr<T>();
    T *po = pos.data_ptr<T>(), *so = san.data_ptr<T>();
    at::parallel_for(0, B, pick_grain(D), [&](int64_t b0, int64_t b1) {
      std::vector<T> a(D), q(D);
      for (int64_t b = b0; b < b1; ++b) {
        po[b] = pos_value(x, b, picks[b].p, D, l2_pos, a.data());
        so[b] = pair_cos(x, picks[b], D, a.data(), q.data()).s;
      }
    });
  });
  return {pos, san};
}

at::Tensor hphn_pick_sims_bwd_cpu(const at::Tensor& grad_pos_, const at::Tensor& grad_san_,
                                  const at::Tensor& xu_, const at::Tensor& idx_, int64_t n,
                                  bool l2_pos) {
  check_pick_inputs(xu_, idx_, n);
  auto xu = xu_.contiguous();
  auto idx = idx_.contiguous();
  const int64_t B = xu.size(0), D = xu.size(1);
  check_vec(grad_pos_, B, "grad_pos");
  check_vec(grad_san_, B, "grad_san");
  auto gp = grad_pos_.to(xu.scalar_type()).contiguous();
  auto gs = grad_san_.to(xu.scalar_type()).contiguous();
  at::Tensor dx = at::zeros_like(xu);
  AT_DISPATCH_FLOATING_TYPES(xu.scalar_type(), "hphn_pick_sims_bwd_cpu", [&] {
    using T = scalar_t;
    const auto picks = read_picks<T>(idx, B, n);
    const T* x = xu.data_ptr<T>();
    const T *gpp = gp.data_ptr<T>(), *gsp = gs.data_ptr<T>();
    // the closest pairs' cosines again (the forward keeps nothing but its two outputs)
    std::vector<PairCos<T>> pc(B);
    at::parallel_for(0, B, pick_grain(D), [&](int64_t b0, int64_t b1) {
      std::vector<T> a(D), q(D);
      for (int64_t b = b0; b < b1; ++b)
        if (gsp[b] != T(0)) pc[b] = pair_cos(x, picks[b], D, a.data(), q.data());
    });
    // dx̂[dst] += w · x̂[src], entries in pick order (≤ 20 per anchor; zero weights dropped)
    std::vector<int64_t> dst, src;
    std::vector<T> w;
    dst.reserve(20 * B), src.reserve(20 * B), w.reserve(20 * B);
    auto add = [&](int64_t i, int64_t j, T v) {
      if (v != T(0)) dst.push_back(i), src.push_back(j), w.push_back(v);
    };
    for (int64_t b = 0; b < B; ++b) {
      const Pick<T>& k = picks[b];
      const T g = gpp[b];
      if (g != T(0)) {
        if (l2_pos) {  // ∂‖x_b − x_p‖² = ±2(x_b − x_p)
          add(b, b, 2 * g), add(b, k.p, -2 * g), add(k.p, k.p, 2 * g), add(k.p, b, -2 * g);
        } else {
          add(b, k.p, g), add(k.p, b, g);
        }
      }
      const T h = gsp[b];
      if (h == T(0)) continue;
      const PairCos<T>& c = pc[b];
      // ∂s/∂a = inv·q − ca·a, ∂s/∂q = inv·a − cq·q, with a = λa x_au + (1−λa) x_aw (and q);
      // ∂a/∂x_au = λa, ∂a/∂x_aw = 1 − λa (lerp's)
      const T la[2] = {k.la, T(1) - k.la}, lq[2] = {k.lq, T(1) - k.lq};
      const int64_t ar[2] = {k.au, k.aw}, qr[2] = {k.qu, k.qw};
      for (int s = 0; s < 2; ++s)
        for (int t = 0; t < 2; ++t) {
          add(ar[s], qr[t], h * la[s] * c.inv * lq[t]);
          add(ar[s], ar[t], -h * la[s] * c.ca * la[t]);
          add(qr[s], ar[t], h * lq[s] * c.inv * la[t]);
          add(qr[s], qr[t], -h * lq[s] * c.cq * lq[t]);
        }
    }
    const int64_t P = int64_t(dst.size());
    gather_rows(dx.data_ptr<T>(), x, Buckets<T>(dst.data(), src.data(), w.data(), P, B), B, D);
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // HPHN's chosen distances from the mined picks idx (B × 7, see above): (pos, s_an) per
  // anchor, pos a cosine or (l2_pos) a squared L2 distance; rows of xu are unit rows
  m.def("hphn_pick_sims(Tensor xu, Tensor idx, int n_points, bool l2_pos) -> (Tensor, Tensor)");
  m.def("hphn_pick_sims_bwd(Tensor grad_pos, Tensor grad_san, Tensor xu, Tensor idx, "
        "int n_points, bool l2_pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("hphn_pick_sims", &hphn_pick_sims_cpu);
  m.impl("hphn_pick_sims_bwd", &hphn_pick_sims_bwd_cpu);
}

}  // namespace metrix_ops
