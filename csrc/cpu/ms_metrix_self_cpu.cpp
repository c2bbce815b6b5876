// Multi-similarity loss of a batch against itself together with its embedding-level Metrix
// term (pairs "pos_neg" or "anchor_neg", DESIGN §3), in one pass over the symmetric S = X Xᵀ: the mixed
// candidates are closed-form functions of the same blocks (common/metrix_mix.h), so the
// Metrix term adds per-element work and no matrix product.
//
// The batch must be sorted by label (the Python side sorts it): blocks are cut between
// classes, so an anchor's positives are rows of its own block and their rows of S are at
// hand (ms_metrix_kernels.h). A class larger than `block` makes a larger block.
//
// Block (I, J), I < J, serves the anchors of I against the negatives in J through s, and
// those of J against I through sᵀ (one transposed copy per block: the mixed terms read two
// rows of S per candidate, which a column walk would make strided). The within-class
// cosines s_ap, which every block of a row needs, are computed once up front (O(B·K·D)).
// Forward keeps per-anchor states only; backward recomputes the blocks (as ms_loss_self).
#include <torch/library.h>

#include "cpu/ms_blocks.h"
#include "cpu/ms_metrix_kernels.h"
#include "cpu/sym_blocks.h"

namespace metrix_ops {

namespace {

// Classes as runs of the sorted labels, the blocks cut between them, and where each row's
// within-class cosines live.
struct ClassLayout {
  std::vector<int64_t> lo, hi, wc_off, bounds;
  int64_t wc_size = 0;
};

ClassLayout class_layout(const at::Tensor& labels, int64_t block) {
  const at::Tensor lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  const int64_t B = lab.size(0);
  ClassLayout c;
  c.lo.resize(B);
  c.hi.resize(B);
  c.wc_off.resize(B);
  c.bounds.push_back(0);
  for (int64_t s = 0; s < B;) {
    int64_t e = s + 1;
    while (e < B && y[e] == y[s]) ++e;
    TORCH_CHECK(e == B || y[e] > y[s], "labels must be sorted (non-decreasing): the Metrix "
                "op cuts its blocks between classes");
    if (e - c.bounds.back() > block && s > c.bounds.back()) c.bounds.push_back(s);
    for (int64_t a = s; a < e; ++a) {
      c.lo[a] = s;
      c.hi[a] = e;
      c.wc_off[a] = c.wc_size + (a - s) * (e - s);
    }
    c.wc_size += (e - s) * (e - s);
    s = e;
  }
  if (B > 0) c.bounds.push_back(B);
  return c;
}

// s_ap for every pair of rows of one class, in the layout's order
template <typename T>
std::vector<T> within_class_cosines(const at::Tensor& x, const ClassLayout& c) {
  std::vector<T> wc(c.wc_size);
  const T* xp = x.data_ptr<T>();
  const int64_t B = x.size(0), D = x.size(1);
  at::parallel_for(0, B, 16, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a)
      for (int64_t p = c.lo[a]; p < c.hi[a]; ++p) {
        T acc = 0;
        for (int64_t k = 0; k < D; ++k) acc += xp[a * D + k] * xp[p * D + k];
        wc[c.wc_off[a] + (p - c.lo[a])] = acc;
      }
  });
  return wc;
}

// 1/‖mix(row, column)‖ for every entry of a block: rsqrt(max(‖v‖², ε²)) is 1/max(‖v‖, ε)
// for ‖v‖² ≥ 0, in ATen's vectorised passes
template <typename T>
at::Tensor mix_inv_norms(const at::Tensor& s, T lam) {
  const double l = lam, q0 = l * l + (1 - l) * (1 - l), q1 = 2 * l * (1 - l);
  return (s * q1 + q0).clamp_min_(kMixEps * kMixEps).rsqrt_();
}

// Fixed shifts for the one-pass fold of the mixed sums (+inf: two passes). Every exponent
// of a cosine in [−1, 1] lies in [top − 2k, top] (k = α or β); shifted by top − H it lies
// in [H − 2k, H]: no term underflows while H − 2k ≥ −87 (fp32), and no sum of up to 2^31
// terms overflows while H + ln 2^31 < 88. fp64 has room for any k that fp32 has.
template <typename T>
std::pair<T, T> ms_metrix_shifts(T alpha, T beta, T base) {
  const T H = 60, inf = std::numeric_limits<T>::infinity();
  if (!(2 * alpha <= H + 80 && 2 * beta <= H + 80)) return {inf, inf};
  return {alpha * (1 + base) - H, beta * (1 - base) - H};
}

// The per-call constants of the Metrix kernels.
template <typename T>
struct MixCall {
  const ClassLayout& cls;
  const int32_t* lab;
  const T* wc;
  T lam, alpha, beta, base;
  bool anchor_neg;
  const T *g = nullptr, *tp = nullptr, *tn = nullptr;
  T* gw = nullptr;

  // fn(a0, a1) for each class among the rows [r0, r0 + nr), in parallel
  template <class Fn>
  void for_classes(int64_t r0, int64_t nr, Fn&& fn) const {
    std::vector<int64_t> starts;
    for (int64_t a = r0; a < r0 + nr; a = cls.hi[a]) starts.push_back(a);
    at::parallel_for(0, static_cast<int64_t>(starts.size()), 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) fn(starts[k], cls.hi[starts[k]]);
    });
  }

  // One side of a block: anchors in the rows [r0, r0 + nr) of s against its columns.
  MixBlock<T> side(const at::Tensor& s, const at::Tensor& inv, int64_t r0, int64_t c0,
                   T* gm) const {
    const auto shifts = ms_metrix_shifts(alpha, beta, base);
    return MixBlock<T>{s.data_ptr<T>(), inv.data_ptr<T>(), s.size(1), r0, c0, lab, lab,
                       cls.lo.data(), cls.hi.data(), wc, cls.wc_off.data(), lam, alpha, beta,
                       base, shifts.first, shifts.second, anchor_neg, g, tp, tn, gm, gw};
  }
};

// (1/α) log(1 + λ Σ e^{−α(s−base)}) + (1/β) log(1 + (1−λ) Σ e^{β(s−base)}) per anchor, and
// the log normalisers the gradient divides by: log(1/λ + Σ e^{·}) (the largest finite value
// when the side's weight is 0, so that its terms come out 0).
template <typename T>
void finish_mixed(const std::vector<OnlineLse<T>>& pos, const std::vector<OnlineLse<T>>& neg,
                  T lam, T alpha, T beta, at::Tensor& rows, at::Tensor& tp, at::Tensor& tn) {
  const T big = std::numeric_limits<T>::max();
  auto side = [&](const OnlineLse<T>& st, T y, T& norm) {
    const T v = st.value();
    if (!(y > T(0))) {
      norm = big;
      return T(0);
    }
    const T ly = std::log(y);
    norm = v > -ly ? v + std::log1p(std::exp(-ly - v)) : -ly + std::log1p(std::exp(v + ly));
    const T x = v + ly;  // log(λ Σ e^·): the softplus below is log(1 + λ Σ e^·)
    return x > T(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
  };
  T *r = rows.data_ptr<T>(), *p = tp.data_ptr<T>(), *n = tn.data_ptr<T>();
  for (size_t a = 0; a < pos.size(); ++a)
    r[a] = side(pos[a], lam, p[a]) / alpha + side(neg[a], T(1) - lam, n[a]) / beta;
}

}  // namespace

using SixTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SixTensors ms_metrix_self_fwd_cpu(const at::Tensor& x_, const at::Tensor& labels_,
                                               double alpha, double beta, double base,
                                               double lam, bool anchor_neg, int64_t block) {
  check_self_inputs(x_, labels_, block);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels_);
  const ClassLayout cls = class_layout(labels_, block);
  const int64_t B = x.size(0);
  auto vec = [&] { return at::zeros({B}, x.options()); };
  at::Tensor rows = vec(), lse_pos = vec(), lse_neg = vec(), mix = vec(), tp = vec(), tn = vec();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_self_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    std::vector<OnlineLse<T>> mpos(B, OnlineLse<T>::empty()), mneg(B, OnlineLse<T>::empty());
    const std::vector<T> wc = within_class_cosines<T>(x, cls);
    const int32_t* lab_ids = ids.data_ptr<int32_t>();
    const BlockLabels lab{lab_ids, lab_ids, true};
    const MixCall<T> mc{cls, lab_ids, wc.data(), T(lam), T(alpha), T(beta), T(base), anchor_neg};
    const auto& k = ms_kernels<T>();
    auto mix_side = [&](const at::Tensor& s, int64_t r0, int64_t nr, int64_t c0) {
      const at::Tensor inv = mix_inv_norms<T>(s, T(lam));
      const MixBlock<T> b = mc.side(s, inv, r0, c0, nullptr);
      mc.for_classes(r0, nr, [&](int64_t a0, int64_t a1) {
        k.mix_fold(b, a0, a1, mpos.data(), mneg.data());
      });
    };
    for_upper_blocks_at(x, cls.bounds, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0,
                                           int64_t nc) {
      mix_side(s, r0, nr, c0);
      if (c0 != r0) mix_side(s.t().contiguous(), c0, nc, r0);
      ms_fold_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, T(alpha), T(beta), T(base),
                       pos.data(), neg.data(), /*cols=*/c0 != r0);
    });
    ms_finish_rows<T>(pos, neg, T(alpha), T(beta), rows, lse_pos, lse_neg);
    finish_mixed<T>(mpos, mneg, T(lam), T(alpha), T(beta), mix, tp, tn);
  });
  return {rows, lse_pos, lse_neg, mix, tp, tn};
}

at::Tensor ms_metrix_self_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& grad_mix,
                                  const at::Tensor& x_, const at::Tensor& labels_,
                                  const at::Tensor& lse_pos_, const at::Tensor& lse_neg_,
                                  const at::Tensor& tp_, const at::Tensor& tn_, double alpha,
                                  double beta, double base, double lam, bool anchor_neg,
                                  int64_t block) {
  check_self_inputs(x_, labels_, block);
  TORCH_CHECK(lam >= 0 && lam <= 1, "lam must be in [0, 1], got ", lam);
  check_vec(grad_rows, x_.size(0), "grad_rows");
  check_vec(grad_mix, x_.size(0), "grad_mix");
  check_vec(lse_pos_, x_.size(0), "lse_pos");
  check_vec(lse_neg_, x_.size(0), "lse_neg");
  check_vec(tp_, x_.size(0), "tp");
  check_vec(tn_, x_.size(0), "tn");
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels_);
  const ClassLayout cls = class_layout(labels_, block);
  auto as_x = [&](const at::Tensor& t) { return t.to(x.scalar_type()).contiguous(); };
  const at::Tensor g = as_x(grad_rows), gmix = as_x(grad_mix), lse_pos = as_x(lse_pos_),
                   lse_neg = as_x(lse_neg_), tp = as_x(tp_), tn = as_x(tn_);
  at::Tensor dx = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_self_bwd_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> wc = within_class_cosines<T>(x, cls);
    std::vector<T> gw(wc.size(), T(0));
    const int32_t* lab_ids = ids.data_ptr<int32_t>();
    const BlockLabels lab{lab_ids, lab_ids, true};
    MixCall<T> mc{cls, lab_ids, wc.data(), T(lam), T(alpha), T(beta), T(base), anchor_neg};
    mc.g = gmix.data_ptr<T>();
    mc.tp = tp.data_ptr<T>();
    mc.tn = tn.data_ptr<T>();
    mc.gw = gw.data();
    const auto& k = ms_kernels<T>();
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    auto mix_side = [&](const at::Tensor& s, int64_t r0, int64_t nr, int64_t c0) {
      const at::Tensor inv = mix_inv_norms<T>(s, T(lam));
      at::Tensor gm = at::zeros_like(s);
      const MixBlock<T> b = mc.side(s, inv, r0, c0, gm.data_ptr<T>());
      mc.for_classes(r0, nr, [&](int64_t a0, int64_t a1) { k.mix_grad(b, a0, a1); });
      return gm;
    };
    for_upper_blocks_at(x, cls.bounds, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0,
                                           int64_t nc) {
      // the mixed terms read s before the clean gradient overwrites it with H = G + Gᵀ
      const at::Tensor gm = mix_side(s, r0, nr, c0);
      const at::Tensor gmt = c0 != r0 ? mix_side(s.t().contiguous(), c0, nc, r0) : gm;
      ms_grad_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, gp, lp, ln, T(alpha), T(beta),
                       T(base), /*sym=*/true);
      s.add_(gm).add_(gmt.t().contiguous());  // ATen's blocked transpose, then a plain add
      add_sym_block_grad(dx, x, s, r0, nr, c0, nc);
    });
    // the within-class entries: dx_a += Σ_p (G_ap + G_pa) x_p
    const T* xp = x.data_ptr<T>();
    T* dp = dx.data_ptr<T>();
    const int64_t D = x.size(1);
    at::parallel_for(0, x.size(0), 16, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a)
        for (int64_t p = cls.lo[a]; p < cls.hi[a]; ++p) {
          const T w = gw[cls.wc_off[a] + (p - cls.lo[a])] + gw[cls.wc_off[p] + (a - cls.lo[a])];
          if (w != T(0))
            for (int64_t kk = 0; kk < D; ++kk) dp[a * D + kk] += w * xp[p * D + kk];
        }
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // MS of a label-sorted batch against itself plus its Metrix (pos_neg, embedding level)
  // term at mixing weight lam, pairs pos_neg (or anchor_neg): (rows, lse_pos, lse_neg, mixed rows, their two log
  // normalisers). The mixed rows are ℓ̃(a), 0 for an anchor with no candidate.
  m.def("ms_metrix_self_fwd(Tensor x, Tensor labels, float alpha, float beta, float base, "
        "float lam, bool anchor_neg, int block) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ms_metrix_self_bwd(Tensor grad_rows, Tensor grad_mix, Tensor x, Tensor labels, "
        "Tensor lse_pos, Tensor lse_neg, Tensor tp, Tensor tn, float alpha, float beta, "
        "float base, float lam, bool anchor_neg, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_metrix_self_fwd", &ms_metrix_self_fwd_cpu);
  m.impl("ms_metrix_self_bwd", &ms_metrix_self_bwd_cpu);
}

}  // namespace metrix_ops
