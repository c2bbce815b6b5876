// Embedding-level Metrix term of ProxyNCALoss(++) on the CPU: the candidates are the mixes
// v = mix(x_u, x_w, λ) of every ordered batch pair u ≠ w of different labels (same label for
// pos_pos), the queries of a soft-target cross-entropy over the C proxies (reference/metrix.py,
// metrix_soft_forms.proxy_nca_soft):
//   ℓ(v) = −Σ_c y_c·log softmax_c(logit(s(v, c))),  y = λ·onehot(y_u) + (1−λ)·onehot(y_w),
// returned per owner row u (Σ_w ℓ(mix(u, w))); the glue takes the mean over candidates.
//
// Nothing of size B²·C or B² is held: sp = X̂ P̂ᵀ (B×C, so a candidate's C cosines are two
// contiguous rows) and one block of Gram rows at a time (at::mm). Each candidate's softmax is
// one pass over its C logits (e^{logit − bound} and their sum, the bound fixed by the metric)
// into a scratch row, which the backward then reads as the softmax (no second exp).
//
// Parallel layout. Forward: over the owner row u, as the proxy-anchor Metrix op. Backward:
// the candidates (u, w) and (w, u) share their Gram entry and feed ∂sp[u,·], ∂sp[w,·] and
// ∂G[u,w], so each unordered pair is visited once, both softmaxes computed there once.
// Pairs go by blocks of rows (gram_rows.h for_pair_blocks): each round of the tournament
// gives every thread two blocks no other task of the round touches, so ∂sp's rows and dX's
// have one writer at a time: deterministic, no atomics, no per-thread B×C copies.
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/proxy_metrix.h"
#include "cpu/gram_rows.h"
#include "cpu/op_checks.h"
#include "cpu/proxy_metrix_lanes.h"
#include "common/op_tags.h"

namespace metrix_ops {
namespace {

using pm::for_lanes;

template <typename T>
struct NcaMix {
  const T* sp;       // X̂ P̂ᵀ, B×C
  const int32_t* y;  // labels
  int64_t B, C;
  T lam, om, c0, c1, scale;
  T bound;           // the logits' upper bound (pm_nca_logit_bound): softmax_row's shift
  bool cosine;       // logit = scale·s, else −scale·(2 − 2s) (squared L2)
  bool same;         // pos_pos: pairs of the same label, else of different labels
};

constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename T>
MO_PM_INLINE bool is_partner(const NcaMix<T>& k, int64_t a, int64_t b) {
  return b != a && (k.same ? k.y[b] == k.y[a] : k.y[b] != k.y[a]);
}

// The candidate mix(u, w) (rows su, sw of sp): e^{logit − shift} into e; returns the
// logsumexp and sets inv_sum = 1 / Σ e (softmax_c = e_c · inv_sum). One pass with the
// logits' bound as the shift (pm_nca_logit_bound); a sum that underflows under it is redone
// with the max.
template <typename T, int W>
MO_PM_INLINE T softmax_row(const NcaMix<T>& k, const T* su, const T* sw, T r, T* e, T& inv_sum) {
  auto exps = [&](T shift) MO_PM_LAMBDA {
    pm::RowSum<T, W> sum;
    for_lanes<T, W>(k.C, [&](auto L, int64_t j) MO_PM_LAMBDA {
      using Ln = decltype(L);
      const auto s = mix_cos(k.lam, k.om, Ln::load(su + j), Ln::load(sw + j), Ln::splat(r));
      const auto v = Ln::exp(pm_nca_logit(s, k.scale, k.cosine) - Ln::splat(shift));
      Ln::store(e + j, v);
      sum.add(L, v);
    });
    return sum.total();
  };
  T shift = k.bound, sum = exps(shift);
  if (!pm::shifted_sum_ok(sum)) {
    pm::RowMax<T, W> mx;
    for_lanes<T, W>(k.C, [&](auto L, int64_t j) MO_PM_LAMBDA {
      using Ln = decltype(L);
      const auto s = mix_cos(k.lam, k.om, Ln::load(su + j), Ln::load(sw + j), Ln::splat(r));
      mx.add(L, pm_nca_logit(s, k.scale, k.cosine));
    });
    shift = mx.total();
    sum = exps(shift);
  }
  inv_sum = T(1) / sum;
  return shift + std::log(sum);
}

// the logit of proxy c for the candidate mix(u, w)
template <typename T>
MO_PM_INLINE T logit_of(const NcaMix<T>& k, const T* su, const T* sw, T r, int32_t c) {
  return pm_nca_logit(mix_cos(k.lam, k.om, su[c], sw[c], r), k.scale, k.cosine);
}

// Σ_w ℓ(mix(a, w)) over row a's candidates; g: its Gram row, e: scratch of length C
template <typename T, int W>
MO_PM_INLINE T fwd_row(const NcaMix<T>& k, int64_t a, const T* g, T* e) {
  const int32_t ya = k.y[a];
  const T* sa = k.sp + a * k.C;
  T total = 0, inv_sum;
  for (int64_t b = 0; b < k.B; ++b) {
    if (!is_partner(k, a, b)) continue;
    const T* sb = k.sp + b * k.C;
    const T r = mix_inv_norm(k.c0, k.c1, g[b]);
    const T lse = softmax_row<T, W>(k, sa, sb, r, e, inv_sum);
    const int32_t yb = k.y[b];
    if (k.same) total -= (k.lam + k.om) * (logit_of(k, sa, sb, r, ya) - lse);
    else total -= k.lam * (logit_of(k, sa, sb, r, ya) - lse) + k.om * (logit_of(k, sa, sb, r, yb) - lse);
  }
  return total;
}

// One pair a < b of partners, both orderings: ∂L/∂sp[a,·] into da, ∂L/∂sp[b,·] into db;
// returns ∂L/∂G[a,b]. q: the upstream gradient of each row's Σ ℓ; g: the Gram entry; lg1,
// lg2: scratch of length C (the two orderings' e^{logit − shift}).
template <typename T, int W>
MO_PM_INLINE T bwd_pair(const NcaMix<T>& k, int64_t a, int64_t b, T g, T* da, T* db,
                        const T* q, T* lg1, T* lg2) {
  const int32_t ya = k.y[a], yb = k.y[b];
  const T* sa = k.sp + a * k.C;
  const T* sb = k.sp + b * k.C;
  const T mass = k.lam + k.om;  // Σ_c y_c of every candidate
  const T r = mix_inv_norm(k.c0, k.c1, g);
  T inv1, inv2;
  softmax_row<T, W>(k, sa, sb, r, lg1, inv1);  // candidate (a, b), in row a's sum
  softmax_row<T, W>(k, sb, sa, r, lg2, inv2);  // candidate (b, a), in row b's sum
  // ∂ℓ/∂logit_c = Y·softmax_c − y_c: the softmax part for every c here, the −y_c part (two
  // classes at most) below. s1 = (λ·s_a + (1−λ)·s_b)·r, s2 = (λ·s_b + (1−λ)·s_a)·r.
  const T f1 = q[a] * mass * inv1, f2 = q[b] * mass * inv2;
  pm::RowSum<T, W> hacc;
  for_lanes<T, W>(k.C, [&](auto L, int64_t j) MO_PM_LAMBDA {
    using Ln = decltype(L);
    const auto u = Ln::load(sa + j), w = Ln::load(sb + j), rv = Ln::splat(r);
    const auto s1 = mix_cos(k.lam, k.om, u, w, rv), s2 = mix_cos(k.lam, k.om, w, u, rv);
    const auto t1 = f1 * Ln::load(lg1 + j) * pm_nca_dlogit(s1, k.scale, k.cosine);
    const auto t2 = f2 * Ln::load(lg2 + j) * pm_nca_dlogit(s2, k.scale, k.cosine);
    Ln::store(da + j, Ln::load(da + j) + rv * (k.lam * t1 + k.om * t2));
    Ln::store(db + j, Ln::load(db + j) + rv * (k.om * t1 + k.lam * t2));
    hacc.add(L, t1 * s1 + t2 * s2);
  });
  // −y_c·dlogit terms; `first`: candidate (a, b) (a's share λ), else (b, a) (a's share 1−λ)
  auto target = [&](bool first, int32_t c, T yc) MO_PM_LAMBDA {
    const T s = first ? mix_cos(k.lam, k.om, sa[c], sb[c], r)
                      : mix_cos(k.lam, k.om, sb[c], sa[c], r);
    const T t = -(first ? q[a] : q[b]) * yc * pm_nca_dlogit(s, k.scale, k.cosine);
    da[c] += r * (first ? k.lam : k.om) * t;
    db[c] += r * (first ? k.om : k.lam) * t;
    hacc.s += t * s;
  };
  if (k.same) {
    target(true, ya, mass);
    target(false, ya, mass);
  } else {
    target(true, ya, k.lam);
    target(true, yb, k.om);
    target(false, yb, k.lam);
    target(false, ya, k.om);
  }
  return mix_norm_coef(k.c1, r) * hacc.total();
}

// The block of pairs rows [a0, a1) × [b0, b1) (only b > a on the diagonal block, a0 == b0):
// g, their Gram entries (row-major), becomes ∂L/∂G of the pairs (0 for the rest); dsp: B×C,
// rows a0..a1 and b0..b1 this task's alone. lg: scratch of 2C.
template <typename T, int W>
MO_PM_INLINE void bwd_block(const NcaMix<T>& k, int64_t a0, int64_t a1, int64_t b0, int64_t b1,
                            T* g, T* dsp, const T* q, T* lg) {
  const int64_t nb = b1 - b0;
  for (int64_t a = a0; a < a1; ++a)
    for (int64_t b = b0; b < b1; ++b) {
      T& h = g[(a - a0) * nb + (b - b0)];
      h = b > a && is_partner(k, a, b)
              ? bwd_pair<T, W>(k, a, b, h, dsp + a * k.C, dsp + b * k.C, q, lg, lg + k.C)
              : T(0);
    }
}

// The row and block kernels at the fp32 kernels' level, as proxy_anchor_metrix_cpu.cpp's: 16
// floats a lane group under AVX-512, 8 under AVX2 (pm::fp32_lanes), 4 in the baseline build;
// fp64 one at a time.
template <typename T>
struct NcaRows {
  T (*fwd)(const NcaMix<T>&, int64_t, const T*, T*);
  void (*bwd)(const NcaMix<T>&, int64_t, int64_t, int64_t, int64_t, T*, T*, const T*, T*);
};

template <typename T, int W>
T fwd_at(const NcaMix<T>& k, int64_t a, const T* g, T* e) { return fwd_row<T, W>(k, a, g, e); }
template <typename T, int W>
void bwd_at(const NcaMix<T>& k, int64_t a0, int64_t a1, int64_t b0, int64_t b1, T* g, T* dsp,
            const T* q, T* lg) {
  bwd_block<T, W>(k, a0, a1, b0, b1, g, dsp, q, lg);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) float fwd_avx2(const NcaMix<float>& k, int64_t a,
                                                   const float* g, float* e) {
  return fwd_row<float, 8>(k, a, g, e);
}
__attribute__((target("avx2,fma"))) void bwd_avx2(const NcaMix<float>& k, int64_t a0,
                                                  int64_t a1, int64_t b0, int64_t b1,
                                                  float* g, float* dsp, const float* q,
                                                  float* lg) {
  bwd_block<float, 8>(k, a0, a1, b0, b1, g, dsp, q, lg);
}
MO_PM_AVX512 float fwd_avx512(const NcaMix<float>& k, int64_t a, const float* g, float* e) {
  return fwd_row<float, 16>(k, a, g, e);
}
MO_PM_AVX512 void bwd_avx512(const NcaMix<float>& k, int64_t a0, int64_t a1, int64_t b0,
                             int64_t b1, float* g, float* dsp, const float* q, float* lg) {
  bwd_block<float, 16>(k, a0, a1, b0, b1, g, dsp, q, lg);
}
#endif

template <typename T>
NcaRows<T> nca_rows() {
  if constexpr (std::is_same_v<T, float>) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (pm::fp32_lanes() == 16) return {&fwd_avx512, &bwd_avx512};
    if (pm::fp32_lanes() == 8) return {&fwd_avx2, &bwd_avx2};
#endif
    return {&fwd_at<float, 4>, &bwd_at<float, 4>};
  } else {
    return {&fwd_at<T, 1>, &bwd_at<T, 1>};
  }
}

void check_args(double lam, double scale, int64_t kind, int64_t B) {
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
  TORCH_CHECK(kind == kNcaCosine || kind == kNcaSquaredL2, "kind must be 0 or 1, got ", kind);
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(B < (int64_t(1) << 31), "x must have fewer than 2^31 rows");
}

template <typename T>
NcaMix<T> make_mix(const T* sp, const int32_t* y, int64_t B, int64_t C, double scale,
                   int64_t kind, double lam, bool same) {
  return NcaMix<T>{sp, y, B, C, T(lam), T(1.0 - lam),
                   T(lam * lam + (1.0 - lam) * (1.0 - lam)), T(2.0 * lam * (1.0 - lam)),
                   T(scale), pm_nca_logit_bound(T(scale), kind == kNcaCosine),
                   kind == kNcaCosine, same};
}

}  // namespace

at::Tensor proxy_nca_metrix_fwd_cpu(const at::Tensor& x_, const at::Tensor& p_,
                                    const at::Tensor& labels_, double scale, int64_t kind,
                                    double lam, bool same_label, int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  auto x = x_.contiguous(), p = p_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  check_args(lam, scale, kind, B);
  at::Tensor rows = at::zeros({B}, x.options());
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_metrix_fwd_cpu", [&] {
    using T = scalar_t;
    const at::Tensor sp = at::mm(x, p.t()).contiguous();
    const auto k = make_mix<T>(sp.data_ptr<T>(), y32.data_ptr<int32_t>(), B, C, scale, kind,
                               lam, same_label);
    T* out = rows.data_ptr<T>();
    const NcaRows<T> kr = nca_rows<T>();
    for_gram_rows<T>(x, chunk, C, nullptr, [&](int64_t a, const T* h, T* lg) {
      out[a] = kr.fwd(k, a, h, lg);
    });
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor> proxy_nca_metrix_bwd_cpu(
    const at::Tensor& grad_rows_, const at::Tensor& x_, const at::Tensor& p_,
    const at::Tensor& labels_, double scale, int64_t kind, double lam, bool same_label,
    int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  const int64_t B = x_.size(0), C = p_.size(0);
  check_args(lam, scale, kind, B);
  check_vec(grad_rows_, B, "grad_rows");
  auto x = x_.contiguous(), p = p_.contiguous();
  auto q = grad_rows_.to(x.scalar_type()).contiguous();
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  at::Tensor dx = at::zeros_like(x), dsp = at::zeros({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_metrix_bwd_cpu", [&] {
    using T = scalar_t;
    const at::Tensor sp = at::mm(x, p.t()).contiguous();
    const auto k = make_mix<T>(sp.data_ptr<T>(), y32.data_ptr<int32_t>(), B, C, scale, kind,
                               lam, same_label);
    const T* qp = q.data_ptr<T>();
    T* d = dsp.data_ptr<T>();
    const NcaRows<T> kr = nca_rows<T>();
    for_pair_blocks(x, pair_block_rows(B, chunk), &dx, [&](int64_t a0, int64_t a1, int64_t b0,
                                                           int64_t b1, at::Tensor& h) {
      std::vector<T> lg(size_t(2 * C));
      kr.bwd(k, a0, a1, b0, b1, h.data_ptr<T>(), d, qp, lg.data());
    });
  });
  dx.addmm_(dsp, p);
  return {dx, at::mm(dsp.t(), x)};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Metrix term of ProxyNCA(++): unit x against unit proxies p, candidates mix(x_u, x_w, lam)
  // of ordered pairs u ≠ w of different labels (same_label: of the same label), Gram rows
  // streamed `chunk` at a time. Per row u: Σ_w −Σ_c y_c·log softmax_c(logit), y the
  // candidate's class mass; kind 0: logit = scale·s, 1: −scale·(2 − 2s).
  m.def("proxy_nca_metrix_fwd(Tensor x, Tensor p, Tensor labels, float scale, int kind, "
        "float lam, bool same_label, int chunk) -> Tensor",
        METRIX_HOST_READS);
  m.def("proxy_nca_metrix_bwd(Tensor grad_rows, Tensor x, Tensor p, Tensor labels, "
        "float scale, int kind, float lam, bool same_label, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("proxy_nca_metrix_fwd", &proxy_nca_metrix_fwd_cpu);
  m.impl("proxy_nca_metrix_bwd", &proxy_nca_metrix_bwd_cpu);
}

}  // namespace metrix_ops
