// Embedding-level Metrix term of ProxyAnchorLoss on the CPU: the proxies are the anchors
// and the candidates are the mixes v = mix(x_u, x_w, λ) of every ordered batch pair u ≠ w of
// different labels (same label for pos_pos), with class mass λ·onehot(y_u) + (1−λ)·onehot(y_w)
// (reference/metrix.py). Per proxy c:
//   pos_c = log(1 + Σ_v y_c(v)·e^{−α(s(v,c) − δ)}),  neg_c = log(1 + Σ_v (1 − y_c(v))·e^{α(s(v,c) + δ)})
// as log-sum-exps of arg + log(weight) (α = 32 overflows a plain sum).
//
// Nothing of size B²·C or B² is held: sp = X̂ P̂ᵀ (kept as Sᵀ, C×B, so a proxy's row of
// partners is contiguous) and one block of Gram rows G[a0:a1, :] at a time (at::mm); each
// candidate's cosine is then O(1) (common/proxy_metrix.h).
//
// Parallel layout. Forward: over the owner row u of the candidates (u, ·), inside each Gram
// block: row u folds its B candidates into one log-sum-exp per proxy, written to its own row
// of a B×C buffer; the per-proxy merge over u then runs in a fixed order, so the result does
// not depend on the thread count. Backward: the candidates (u, w) and (w, u) share their
// Gram entry and their two cosines' sources, and feed ∂sp[u,c], ∂sp[w,c] and ∂G[u,w]; each
// unordered pair u < w is visited once (in the block of u), both orderings' exps computed
// there once. The work is split over proxies: a task owns ∂spᵀ's rows of its proxies
// outright (C×B, no atomics) and sums its share of ∂G into its own block-sized buffer,
// which are added in task order after each block: deterministic for a thread count. The
// blocks have chunk / tasks rows, so the buffers together hold chunk × B values.
#include <algorithm>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/lse_acc.h"
#include "common/proxy_metrix.h"
#include "cpu/gram_rows.h"
#include "cpu/op_checks.h"
#include "cpu/proxy_metrix_lanes.h"
#include "common/op_tags.h"

namespace metrix_ops {
namespace {

using pm::for_lanes;

// Log class-mass weights of the candidates (a, w) ("u") and (w, a) ("v") on a proxy c, for a
// partner w not of class c (…0) or of class c (…1), on the positive (p) and negative (n)
// sides. They depend only on whether a is of class c: computed once a call, for both cases,
// not per (row, proxy) in the loops.
template <typename T>
struct PaLogW {
  T pu0, pu1, pv0, pv1, nu0, nu1, nv0, nv1;
};

template <typename T>
PaLogW<T> pa_log_weights(T lam, T om, bool is_a) {
  const T u0 = is_a ? lam : T(0), u1 = u0 + om;  // mass on c of (a, w)
  const T v0 = is_a ? om : T(0), v1 = lam + v0;  // of (w, a)
  return {log_weight(u0),        log_weight(u1),        log_weight(v0),
          log_weight(v1),        log_weight(T(1) - u0), log_weight(T(1) - u1),
          log_weight(T(1) - v0), log_weight(T(1) - v1)};
}

template <typename T>
struct PaMix {
  const T* st;          // Sᵀ = P̂ X̂ᵀ, C×B
  const int32_t* y;     // labels
  const int64_t* cnt;   // examples per class
  int64_t B, C;
  T lam, om, c0, c1, alpha, margin;
  T bound;              // every exponent's upper bound (pa_arg_bound): the fixed shift
  bool same;            // pos_pos: pairs of the same label, else of different labels
  PaLogW<T> lw[2];      // pa_log_weights, [whether the row is of the proxy's class]
};

constexpr double kInf = std::numeric_limits<double>::infinity();

// Lanes j.. that are candidates (a, j): j ≠ a and the pair's labels as `same` asks
template <typename Ln, typename T>
MO_PM_INLINE typename Ln::M partners(const PaMix<T>& k, int64_t a, int32_t ya, int64_t j) {
  return Ln::not_index(j, a) & (k.same ? Ln::eq(k.y + j, ya) : Ln::ne(k.y + j, ya));
}

// Whether a row of label ya can have partners of class c: of a's label when the pairs share
// it, of another label when they do not; and c present beyond row a itself
template <typename T>
MO_PM_INLINE bool partners_of(const PaMix<T>& k, int32_t ya, int32_t c) {
  const bool is_a = c == ya;
  return (k.same == is_a) && k.cnt[c] > (is_a ? 1 : 0);
}

// Row a's log-sum-exp of the positive and negative exponents over its candidates (a, w),
// for every proxy; r: the Gram row, turned into 1/‖v‖ in place. One pass a proxy: the exps
// are shifted by the exponents' bound (pa_arg_bound), not by their max, and only a sum that
// underflows under that shift (α far above 32, or a proxy far from every candidate) is
// redone with the max first.
template <typename T, int W>
MO_PM_INLINE void fwd_row(const PaMix<T>& k, int64_t a, T* r, T* outp, T* outn) {
  const int64_t B = k.B;
  const int32_t ya = k.y[a];
  const T ninf = -T(kInf);
  int64_t n_partners = 0;
  for (int64_t j = 0; j < B; ++j) {
    r[j] = mix_inv_norm(k.c0, k.c1, r[j]);
    n_partners += partners<pm::Lane<T, 1>>(k, a, ya, j);
  }
  if (n_partners == 0) {  // no candidates: every sum is empty
    std::fill(outp, outp + k.C, ninf);
    std::fill(outn, outn + k.C, ninf);
    return;
  }
  for (int64_t c = 0; c < k.C; ++c) {
    const T* sc = k.st + c * B;
    const T sa = sc[a];
    // mass of the candidate on c: λ if a is of class c, plus (1−λ) if the partner is
    const PaLogW<T>& lw = k.lw[int32_t(c) == ya];
    const T p0 = lw.pu0, p1 = lw.pu1, n0 = lw.nu0, n1 = lw.nu1;
    // positive terms: every partner when a's own share is on c, else only the partners of
    // class c (few; of a's class when the partners share a's label, of another class when
    // they do not): lane groups without one skip the positive exponent
    const bool pos_all = p0 > ninf;
    const bool do_pos = pos_all || (p1 > ninf && partners_of(k, ya, int32_t(c)));
    // returns whether vp holds positive exponents for this lane group
    auto args = [&](auto L, int64_t j, auto& vp, auto& vn) MO_PM_LAMBDA {
      using Ln = decltype(L);
      const auto valid = partners<Ln>(k, a, ya, j);
      const auto own = Ln::eq(k.y + j, int32_t(c));
      const auto s = mix_cos(k.lam, k.om, Ln::splat(sa), Ln::load(sc + j), Ln::load(r + j));
      const auto al = Ln::splat(k.alpha), mg = Ln::splat(k.margin), off = Ln::splat(ninf);
      vn = Ln::sel(valid, pa_neg_arg(s, al, mg) + Ln::sel(own, Ln::splat(n1), Ln::splat(n0)), off);
      if (!(pos_all || (do_pos && Ln::any(own)))) return false;
      vp = Ln::sel(valid, pa_pos_arg(s, al, mg) + Ln::sel(own, Ln::splat(p1), Ln::splat(p0)), off);
      return true;
    };
    // Σ e^{arg − shift} of both sides in one pass
    auto sums = [&](T shift_p, T shift_n, T& sp, T& sn) MO_PM_LAMBDA {
      pm::RowSum<T, W> ap, an;
      for_lanes<T, W>(B, [&](auto L, int64_t j) MO_PM_LAMBDA {
        using Ln = decltype(L);
        typename Ln::V vp{}, vn{};
        const bool has_pos = args(L, j, vp, vn);
        an.add(L, Ln::exp(vn - Ln::splat(shift_n)));
        if (has_pos) ap.add(L, Ln::exp(vp - Ln::splat(shift_p)));
      });
      sp = ap.total();
      sn = an.total();
    };
    T mp = k.bound, mn = k.bound, sp, sn;
    sums(mp, mn, sp, sn);
    if (!pm::shifted_sum_ok(sn) || (do_pos && !pm::shifted_sum_ok(sp))) {
      pm::RowMax<T, W> xp, xn;
      for_lanes<T, W>(B, [&](auto L, int64_t j) MO_PM_LAMBDA {
        typename decltype(L)::V vp{}, vn{};
        if (args(L, j, vp, vn)) xp.add(L, vp);
        xn.add(L, vn);
      });
      mp = do_pos ? xp.total() : ninf;
      mn = xn.total();
      // an empty side (max −inf) sums to 0 under a shift of 0
      sums(mp > ninf ? mp : T(0), mn > ninf ? mn : T(0), sp, sn);
    }
    outp[c] = do_pos && mp > ninf ? mp + std::log(sp) : ninf;
    outn[c] = mn > ninf ? mn + std::log(sn) : ninf;
  }
}

// One task's share of a Gram block's backward: proxies [c0, c1), rows a of the block, each
// against its partners w > a. For the candidates (a, w) and (w, a): ∂L/∂s into dT (∂spᵀ,
// C×B: rows c0..c1 are this task's) and Σ_c ∂L/∂s·s into hp (len×B, this task's, row a −
// start), to be scaled by ∂s/∂G / s (mix_norm_coef) once the tasks are summed. R: the
// block's 1/‖v‖ (len×B, above the diagonal).
template <typename T, int W>
MO_PM_INLINE void bwd_task(const PaMix<T>& k, int64_t c0, int64_t c1, int64_t start,
                           int64_t len, const T* R, T* hp, T* dT, const T* gp, const T* gn,
                           const T* lp, const T* ln) {
  const int64_t B = k.B;
  const T ninf = -T(kInf);
  constexpr int64_t kTile = 16;  // proxies a row meets while its R and hp rows are in cache
  for (int64_t cb = c0; cb < c1; cb += kTile) {
    const int64_t ce = std::min(cb + kTile, c1);
    for (int64_t a = start; a < start + len; ++a) {
      const int32_t ya = k.y[a];
      const T* rr = R + (a - start) * B;
      T* hrow = hp + (a - start) * B;
      const int64_t j0 = a + 1;
      for (int64_t c = cb; c < ce; ++c) {
        const T* sc = k.st + c * B;
        T* dc = dT + c * B;
        const T sa = sc[a];
        const PaLogW<T>& lw = k.lw[int32_t(c) == ya];  // locals: the lambda captures them
        const T pu0 = lw.pu0, pu1 = lw.pu1, pv0 = lw.pv0, pv1 = lw.pv1;
        const T nu0 = lw.nu0, nu1 = lw.nu1, nv0 = lw.nv0, nv1 = lw.nv1;
        // as in fwd_row: positive terms for every partner, or only for the partners of c
        const bool pos_all = pu0 > ninf || pv0 > ninf;
        const bool do_pos =
            pos_all || ((pu1 > ninf || pv1 > ninf) && partners_of(k, ya, int32_t(c)));
        // d(term)/ds = −α·gp·e^{pos arg − pos_c} + α·gn·e^{neg arg − neg_c}
        const T cp = -k.alpha * gp[c], cn = k.alpha * gn[c], lpc = lp[c], lnc = ln[c];
        pm::RowSum<T, W> dsa;
        for_lanes<T, W>(B - j0, [&](auto L, int64_t jj) MO_PM_LAMBDA {
          using Ln = decltype(L);
          const int64_t j = j0 + jj;
          const auto valid = partners<Ln>(k, a, ya, j);
          const auto own = Ln::eq(k.y + j, int32_t(c));
          const auto rv = Ln::load(rr + j), sw = Ln::load(sc + j), sav = Ln::splat(sa);
          const auto s1 = mix_cos(k.lam, k.om, sav, sw, rv);  // candidate (a, w)
          const auto s2 = mix_cos(k.lam, k.om, sw, sav, rv);  // candidate (w, a)
          const auto al = Ln::splat(k.alpha), mg = Ln::splat(k.margin);
          auto pick = [&](T one, T zero) MO_PM_LAMBDA {
            return Ln::sel(own, Ln::splat(one), Ln::splat(zero));
          };
          auto g1 = cn * Ln::exp(pa_neg_arg(s1, al, mg) + pick(nu1, nu0) - Ln::splat(lnc));
          auto g2 = cn * Ln::exp(pa_neg_arg(s2, al, mg) + pick(nv1, nv0) - Ln::splat(lnc));
          if (pos_all || (do_pos && Ln::any(own))) {
            g1 += cp * Ln::exp(pa_pos_arg(s1, al, mg) + pick(pu1, pu0) - Ln::splat(lpc));
            g2 += cp * Ln::exp(pa_pos_arg(s2, al, mg) + pick(pv1, pv0) - Ln::splat(lpc));
          }
          g1 = Ln::sel(valid, g1, Ln::splat(T(0)));
          g2 = Ln::sel(valid, g2, Ln::splat(T(0)));
          // s1 = (λ·s_a + (1−λ)·s_w)·r, s2 = (λ·s_w + (1−λ)·s_a)·r
          dsa.add(L, rv * (k.lam * g1 + k.om * g2));
          Ln::store(dc + j, Ln::load(dc + j) + rv * (k.om * g1 + k.lam * g2));
          Ln::store(hrow + j, Ln::load(hrow + j) + (g1 * s1 + g2 * s2));
        });
        dc[a] += dsa.total();
      }
    }
  }
}

// The row and task kernels at the fp32 kernels' level (pm::fp32_lanes): 16 floats a lane
// group under AVX-512, 8 under AVX2, 4 in the baseline build; fp64 one element at a time. The
// exps are most of the term's time.
template <typename T>
struct PaRows {
  void (*fwd)(const PaMix<T>&, int64_t, T*, T*, T*);
  void (*bwd)(const PaMix<T>&, int64_t, int64_t, int64_t, int64_t, const T*, T*, T*,
              const T*, const T*, const T*, const T*);
};

template <typename T, int W>
void fwd_at(const PaMix<T>& k, int64_t a, T* r, T* outp, T* outn) {
  fwd_row<T, W>(k, a, r, outp, outn);
}
template <typename T, int W>
void bwd_at(const PaMix<T>& k, int64_t c0, int64_t c1, int64_t start, int64_t len, const T* R,
            T* hp, T* dT, const T* gp, const T* gn, const T* lp, const T* ln) {
  bwd_task<T, W>(k, c0, c1, start, len, R, hp, dT, gp, gn, lp, ln);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void fwd_avx2(const PaMix<float>& k, int64_t a, float* r,
                                                  float* outp, float* outn) {
  fwd_row<float, 8>(k, a, r, outp, outn);
}
__attribute__((target("avx2,fma"))) void bwd_avx2(const PaMix<float>& k, int64_t c0,
                                                  int64_t c1, int64_t start, int64_t len,
                                                  const float* R, float* hp, float* dT,
                                                  const float* gp, const float* gn,
                                                  const float* lp, const float* ln) {
  bwd_task<float, 8>(k, c0, c1, start, len, R, hp, dT, gp, gn, lp, ln);
}
MO_PM_AVX512 void fwd_avx512(const PaMix<float>& k, int64_t a, float* r, float* outp,
                             float* outn) {
  fwd_row<float, 16>(k, a, r, outp, outn);
}
MO_PM_AVX512 void bwd_avx512(const PaMix<float>& k, int64_t c0, int64_t c1, int64_t start,
                             int64_t len, const float* R, float* hp, float* dT,
                             const float* gp, const float* gn, const float* lp,
                             const float* ln) {
  bwd_task<float, 16>(k, c0, c1, start, len, R, hp, dT, gp, gn, lp, ln);
}
#endif

template <typename T>
PaRows<T> pa_rows() {
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

void check_mix_args(double lam, int64_t B, int64_t C) {
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
  TORCH_CHECK(B < (int64_t(1) << 31) && C < (int64_t(1) << 31),
              "x and proxies must have fewer than 2^31 rows");
}

template <typename T>
PaMix<T> make_mix(const T* st, const int32_t* y, const int64_t* cnt, int64_t B, int64_t C,
                  double alpha, double margin, double lam, bool same) {
  const T l = T(lam), om = T(1.0 - lam);
  return PaMix<T>{st, y, cnt, B, C, l, om,
                  T(lam * lam + (1.0 - lam) * (1.0 - lam)), T(2.0 * lam * (1.0 - lam)),
                  T(alpha), T(margin), pa_arg_bound(T(alpha), T(margin)), same,
                  {pa_log_weights(l, om, false), pa_log_weights(l, om, true)}};
}

std::vector<int64_t> class_counts(const at::Tensor& y32, int64_t C) {
  std::vector<int64_t> cnt(C, 0);
  const int32_t* y = y32.data_ptr<int32_t>();
  for (int64_t j = 0; j < y32.numel(); ++j) ++cnt[y[j]];
  return cnt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> proxy_anchor_metrix_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& p_, const at::Tensor& labels_, double alpha,
    double margin, double lam, bool same_label, int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  auto x = x_.contiguous(), p = p_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  check_mix_args(lam, B, C);
  at::Tensor pos = at::zeros({C}, x.options()), neg = at::zeros({C}, x.options());
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  const std::vector<int64_t> cnt = class_counts(y32, C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_metrix_fwd_cpu", [&] {
    using T = scalar_t;
    const at::Tensor st = at::mm(p, x.t()).contiguous();
    const auto k = make_mix<T>(st.data_ptr<T>(), y32.data_ptr<int32_t>(), cnt.data(), B, C,
                               alpha, margin, lam, same_label);
    at::Tensor rows_p = at::empty({B, C}, x.options()), rows_n = at::empty({B, C}, x.options());
    T *rp = rows_p.data_ptr<T>(), *rn = rows_n.data_ptr<T>();
    const PaRows<T> rows = pa_rows<T>();
    for_gram_rows<T>(x, chunk, 0, nullptr, [&](int64_t a, T* h, T*) {
      rows.fwd(k, a, h, rp + a * C, rn + a * C);
    });
    // log(1 + Σ over rows), merged in row order
    T *po = pos.data_ptr<T>(), *ne = neg.data_ptr<T>();
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        OnlineLse<T> lp = lse_with_one<T>(), ln = lse_with_one<T>();
        for (int64_t a = 0; a < B; ++a) {
          lp.push(rp[a * C + c]);
          ln.push(rn[a * C + c]);
        }
        po[c] = lp.value();
        ne[c] = ln.value();
      }
    });
  });
  return {pos, neg};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_metrix_bwd_cpu(
    const at::Tensor& grad_pos_, const at::Tensor& grad_neg_, const at::Tensor& x_,
    const at::Tensor& p_, const at::Tensor& labels_, const at::Tensor& pos_,
    const at::Tensor& neg_, double alpha, double margin, double lam, bool same_label,
    int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  const int64_t B = x_.size(0), C = p_.size(0);
  check_mix_args(lam, B, C);
  check_vec(grad_pos_, C, "grad_pos");
  check_vec(grad_neg_, C, "grad_neg");
  check_vec(pos_, C, "pos");
  check_vec(neg_, C, "neg");
  auto x = x_.contiguous(), p = p_.contiguous();
  const auto dt = x.scalar_type();
  auto gp = grad_pos_.to(dt).contiguous(), gn = grad_neg_.to(dt).contiguous();
  auto lp = pos_.to(dt).contiguous(), ln = neg_.to(dt).contiguous();
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  const std::vector<int64_t> cnt = class_counts(y32, C);
  at::Tensor dx = at::zeros_like(x), dspT = at::zeros({C, B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "proxy_anchor_metrix_bwd_cpu", [&] {
    using T = scalar_t;
    const at::Tensor st = at::mm(p, x.t()).contiguous();
    const auto k = make_mix<T>(st.data_ptr<T>(), y32.data_ptr<int32_t>(), cnt.data(), B, C,
                               alpha, margin, lam, same_label);
    T* dT = dspT.data_ptr<T>();
    const T *gpp = gp.data_ptr<T>(), *gnp = gn.data_ptr<T>();
    const T *lpp = lp.data_ptr<T>(), *lnp = ln.data_ptr<T>();
    const PaRows<T> rows = pa_rows<T>();
    // tasks over the proxies, each with its own share of ∂G (one block's size); blocks of
    // chunk / tasks rows, so that the shares together stay within chunk × B
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), C));
    const int64_t block_rows = std::max<int64_t>(1, std::min(chunk / tasks, B));
    std::vector<T> parts(size_t(tasks * block_rows * B));
    for_gram_blocks(x, block_rows, &dx, [&](int64_t start, int64_t len, at::Tensor& gb) {
      T* g = gb.data_ptr<T>();
      const int64_t n = len * B;
      at::parallel_for(start, start + len, 1, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          T* row = g + (a - start) * B;
          for (int64_t j = a + 1; j < B; ++j) row[j] = mix_inv_norm(k.c0, k.c1, row[j]);
        }
      });
      std::fill(parts.begin(), parts.begin() + tasks * n, T(0));
      at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          rows.bwd(k, C * t / tasks, C * (t + 1) / tasks, start, len, g, parts.data() + t * n,
                   dT, gpp, gnp, lpp, lnp);
      });
      // ∂L/∂G above the diagonal: the tasks' Σ ∂L/∂s·s in task order, times ∂s/∂G / s
      at::parallel_for(start, start + len, 1, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          T* row = g + (a - start) * B;
          for (int64_t j = 0; j <= a; ++j) row[j] = 0;
          for (int64_t j = a + 1; j < B; ++j) {
            T h = 0;
            for (int64_t t = 0; t < tasks; ++t) h += parts[t * n + (a - start) * B + j];
            row[j] = mix_norm_coef(k.c1, row[j]) * h;
          }
        }
      });
    });
  });
  dx.addmm_(dspT.t(), p);
  return {dx, at::mm(dspT, x)};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Metrix term of the proxy-anchor loss: unit x against unit proxies p, candidates
  // mix(x_u, x_w, lam) of ordered pairs u ≠ w of different labels (same_label: of the same
  // label), Gram rows streamed `chunk` at a time. Per proxy: log(1 + Σ y·e^{−α(s−δ)}) and
  // log(1 + Σ (1−y)·e^{α(s+δ)}), y the candidate's class mass on the proxy.
  m.def("proxy_anchor_metrix_fwd(Tensor x, Tensor p, Tensor labels, float alpha, float margin, "
        "float lam, bool same_label, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("proxy_anchor_metrix_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor p, "
        "Tensor labels, Tensor pos, Tensor neg, float alpha, float margin, float lam, "
        "bool same_label, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("proxy_anchor_metrix_fwd", &proxy_anchor_metrix_fwd_cpu);
  m.impl("proxy_anchor_metrix_bwd", &proxy_anchor_metrix_bwd_cpu);
}

}  // namespace metrix_ops
