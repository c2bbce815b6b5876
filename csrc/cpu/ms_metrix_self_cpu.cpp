// Multi-similarity loss of a batch against itself together with its embedding-level Metrix
// term (pairs "pos_neg" or "anchor_neg", DESIGN §3), in one pass over the symmetric S = X Xᵀ
// (the block walk of metrix_blocks.h; the per-candidate MS terms in ms_metrix_kernels.h).
#include <torch/library.h>

#include "cpu/ms_blocks.h"
#include "cpu/metrix_blocks.h"
#include "cpu/ms_metrix_kernels.h"

namespace metrix_ops {

namespace {

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

// The MS constants of the Metrix kernels, and one block side's MixBlock.
template <typename T>
struct MsMix {
  T alpha, beta, base;
  const T *g = nullptr, *tp = nullptr, *tn = nullptr;

  MixBlock<T> side(const MixGeom<T>& geo) const {
    const auto shifts = ms_metrix_shifts(alpha, beta, base);
    return MixBlock<T>{geo, alpha, beta, base, shifts.first, shifts.second, g, tp, tn};
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
    const MixLayout<T> ml{cls, lab_ids, wc.data(), T(lam), anchor_neg};
    const MsMix<T> mm{T(alpha), T(beta), T(base)};
    const auto& k = ms_kernels<T>();
    metrix_fold_blocks<T>(
        x, ml,
        [&](const MixGeom<T>& geo) {
          return [&k, b = mm.side(geo), &mpos, &mneg](int64_t a0, int64_t a1) {
            k.mix_fold(b, a0, a1, mpos.data(), mneg.data());
          };
        },
        [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
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
  at::Tensor dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_metrix_self_bwd_cpu", [&] {
    using T = scalar_t;
    const std::vector<T> wc = within_class_cosines<T>(x, cls);
    std::vector<T> gw(wc.size(), T(0));
    const int32_t* lab_ids = ids.data_ptr<int32_t>();
    const BlockLabels lab{lab_ids, lab_ids, true};
    MixLayout<T> ml{cls, lab_ids, wc.data(), T(lam), anchor_neg};
    ml.gw = gw.data();
    MsMix<T> mm{T(alpha), T(beta), T(base)};
    mm.g = gmix.data_ptr<T>();
    mm.tp = tp.data_ptr<T>();
    mm.tn = tn.data_ptr<T>();
    const auto& k = ms_kernels<T>();
    const T *gp = g.data_ptr<T>(), *lp = lse_pos.data_ptr<T>(), *ln = lse_neg.data_ptr<T>();
    dx = metrix_grad_blocks<T>(
        x, ml,
        [&](const MixGeom<T>& geo) {
          return [&k, b = mm.side(geo)](int64_t a0, int64_t a1) { k.mix_grad(b, a0, a1); };
        },
        [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
          ms_grad_block<T>(s.data_ptr<T>(), nr, nc, r0, c0, lab, gp, lp, ln, T(alpha), T(beta),
                           T(base), /*sym=*/true);
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
