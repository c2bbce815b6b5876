// Fused proxy-anchor loss on the CPU: unit embeddings x (B×D) against unit proxies p (C×D),
// streaming Sᵀ = p xᵀ in chunks of proxies; never B×C.
//
// The proxies are the anchors, so each proxy's two log-sum-exps run over the whole batch:
// chunking proxies keeps every such sum inside one chunk, as one contiguous row of the tile
// (no cross-chunk merging, no column scans). Forward returns the per-proxy terms, which are
// also the log-sum-exps the backward needs; backward recomputes each tile, turns it into the
// tile of Gᵀ = (∂L/∂S)ᵀ in place, then dp_c = Gᵀ_c x and dx += G_c p_c. When a gradient is
// wanted the module takes proxy_anchor_grad_fwd instead (pa_fwd with_grad): the same tile
// turned into the negative side's Gᵀ in the forward, three products in all, not four.
//
// Per row, the positives (few: a proxy's own class) are found through a by-class index and
// folded one by one; the negatives are every other entry: one pass for their largest
// exponent, one summing e^{arg − max}. fp32 runs those passes 4 floats at a time with
// fast_exp (branch-free; scalar std::exp and an online update cost as much as the products),
// fp64 one element at a time with std::exp.
//
// proxy_anchor_weighted_*: the same with a per-example log-weight lw_j added to every
// exponent of example j (PML's ProxyAnchorLoss with an indices_tuple: w − 1, w the example's
// count in the tuple over the largest count; reference/proxy_anchor.py). lw = nullptr: none.
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/fast_exp.h"
#include "common/proxy_anchor.h"
#include "cpu/op_checks.h"
#include "common/op_tags.h"

namespace metrix_ops {
namespace {

// SSE2's native width, which the baseline build has everywhere (wider vectors would be
// split, and their selects scalarised)
constexpr int W = 4;
using FV = Lanes<W>::F;
using IV = Lanes<W>::I;

inline FV loadv(const float* p) { FV v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void storev(float* p, FV v) { std::memcpy(p, &v, sizeof(v)); }
inline IV ownv(const int32_t* y, int32_t c) {  // −1 where y_j == c
  IV v;
  std::memcpy(&v, y, sizeof(v));
  return v == (IV{} + c);
}

template <typename T>
T exp_of(T v) {
  if constexpr (std::is_same_v<T, float>) return fast_exp(v);
  else return std::exp(v);
}

// example j's log-weight (0 without weights), scalar and 4 at a time
template <typename T>
T lw_at(const T* lw, int64_t j) { return lw ? lw[j] : T(0); }
inline FV lw_at4(const float* lw, int64_t j) { return lw ? loadv(lw + j) : FV{}; }

// log(1 + Σ_{y_j ≠ c} e^{α(s_j + δ) + lw_j}) over one row of Sᵀ (proxy c against the batch)
template <typename T>
T pa_neg_lse(const T* row, const int32_t* y, int64_t B, int32_t c, T a, T m, const T* lw) {
  T mx = 0;  // the e^0 term
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const FV av = FV{} + a, mv = FV{} + m;
    FV mxv = FV{};
    for (; j + W <= B; j += W) {
      const FV v = ownv(y + j, c) ? FV{} : pa_neg_arg(loadv(row + j), av, mv) + lw_at4(lw, j);
      mxv = v > mxv ? v : mxv;
    }
    for (int k = 0; k < W; ++k) mx = std::max(mx, mxv[k]);
  }
  for (int64_t k = j; k < B; ++k)
    if (y[k] != c) mx = std::max(mx, pa_neg_arg(row[k], a, m) + lw_at(lw, k));
  T sum = exp_of(-mx);
  j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const FV av = FV{} + a, mv = FV{} + m, mxv = FV{} + mx;
    FV acc{};
    for (; j + W <= B; j += W) {
      const FV e = fast_exp<FV, IV>(pa_neg_arg(loadv(row + j), av, mv) + lw_at4(lw, j) - mxv);
      acc += ownv(y + j, c) ? FV{} : e;
    }
    for (int k = 0; k < W; ++k) sum += acc[k];
  }
  for (; j < B; ++j)
    if (y[j] != c) sum += exp_of(pa_neg_arg(row[j], a, m) + lw_at(lw, j) - mx);
  return mx + std::log(sum);
}

// the row of Sᵀ becomes the row of Gᵀ: ∂L/∂s_jc from the proxy's two finished terms
// (a weight shifts the finished term the entry is divided by: e^{arg + lw − lse})
template <typename T>
void pa_grad_row(T* row, const int32_t* y, int64_t B, int32_t c, T a, T m, T gp, T gn, T lp,
                 T ln, const T* lw) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const FV av = FV{} + a, mv = FV{} + m, lpv = FV{} + lp, lnv = FV{} + ln;
    const FV cp = FV{} - a * gp, cn = FV{} + a * gn;  // pa_pos_grad / pa_neg_grad factors
    for (; j + W <= B; j += W) {
      const FV s = loadv(row + j);
      const IV own = ownv(y + j, c);
      const FV arg = (own ? pa_pos_arg(s, av, mv) - lpv : pa_neg_arg(s, av, mv) - lnv)
                     + lw_at4(lw, j);
      storev(row + j, (own ? cp : cn) * fast_exp<FV, IV>(arg));
    }
  }
  for (; j < B; ++j)
    row[j] = pa_grad(row[j], y[j] == c, a, m, gp, gn, lp - lw_at(lw, j), ln - lw_at(lw, j));
}

// example indices by class (a counting sort): the positives of proxy c are
// idx[off[c] .. off[c+1])
struct ByClass {
  std::vector<int64_t> off, idx;
  ByClass(const int32_t* y, int64_t B, int64_t C) : off(C + 1, 0), idx(B) {
    for (int64_t j = 0; j < B; ++j) ++off[y[j] + 1];
    for (int64_t c = 0; c < C; ++c) off[c + 1] += off[c];
    std::vector<int64_t> at(off.begin(), off.end() - 1);
    for (int64_t j = 0; j < B; ++j) idx[at[y[j]]++] = j;
  }
};

}  // namespace

namespace {

// lw: undefined, or the per-example log-weights (B,) of x's dtype
at::Tensor checked_log_w(const at::Tensor& lw, const at::Tensor& x) {
  if (!lw.defined()) return lw;
  TORCH_CHECK(lw.dim() == 1 && lw.size(0) == x.size(0) && lw.scalar_type() == x.scalar_type() &&
                  lw.device() == x.device(),
              "log_w must be a (", x.size(0), ",) tensor of x's dtype and device, got shape ",
              lw.sizes(), " ", lw.scalar_type());
  return lw.contiguous();
}

template <typename T>
const T* lw_ptr(const at::Tensor& lw) { return lw.defined() ? lw.data_ptr<T>() : nullptr; }

// The forward: per proxy, log(1 + Σ_pos e^{·}) and log(1 + Σ_neg e^{·}); with_grad also the
// gradient's parts (proxy_anchor_grad_fwd): once a tile's terms are done it is turned in
// place into the negative side's Gᵀ at unit upstream gradient (every proxy's
// ∂L/∂neg_c = 1), and dp_neg = Gᵀ x, dx_neg += G p follow: three products in all, where
// forward plus pa_bwd take four (the backward recomputes each tile). The positive side has
// one entry per example (its own class's proxy), so it needs no product: its weights
// w_j = ∂pos_{y_j}/∂s_{j,y_j} are kept, and the backward applies any per-proxy upstream
// gradient to them exactly (proxy_anchor_grad_bwd). (pos, neg, w, dx_neg, dp_neg), the last
// three undefined without with_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pa_fwd(
    const at::Tensor& x_, const at::Tensor& p_, const at::Tensor& labels_, const at::Tensor& lw_,
    double alpha, double margin, int64_t chunk, bool with_grad) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  const at::Tensor lwc = checked_log_w(lw_, x);
  TORCH_CHECK(!(with_grad && lwc.defined()), "the gradient's parts have no weighted form");
  const int64_t B = x.size(0), C = p.size(0);
  at::Tensor pos = at::zeros({C}, x.options()), neg = at::zeros({C}, x.options());
  at::Tensor w, dx, dp;
  if (with_grad) w = at::zeros({B}, x.options()), dx = at::zeros_like(x), dp = at::empty_like(p);
  const at::Tensor y32 = labels.to(at::kInt).contiguous();  // in [0, C): fits
  const ByClass by(y32.data_ptr<int32_t>(), B, C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_fwd_cpu", [&] {
    using T = scalar_t;
    const int32_t* y = y32.data_ptr<int32_t>();
    T *po = pos.data_ptr<T>(), *ne = neg.data_ptr<T>();
    T* wp = with_grad ? w.data_ptr<T>() : nullptr;
    const T a = T(alpha), m = T(margin);
    const T* lw = lw_ptr<T>(lwc);
    at::Tensor buf = at::empty({std::min(chunk, C), B}, x.options());  // one tile, reused
    for (int64_t start = 0; start < C; start += chunk) {
      const int64_t len = std::min(chunk, C - start);
      at::Tensor pc = p.narrow(0, start, len);
      at::Tensor st = buf.narrow(0, 0, len);  // a row prefix: contiguous
      at::mm_out(st, pc, x.t());
      T* s = st.data_ptr<T>();
      at::parallel_for(0, len, row_grain(B), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = start + r;
          T* row = s + r * B;
          OnlineLse<T> lp = lse_with_one<T>();
          for (int64_t k = by.off[c]; k < by.off[c + 1]; ++k)
            lp.push(pa_pos_arg(row[by.idx[k]], a, m) + lw_at(lw, by.idx[k]));
          po[c] = lp.value();  // log(1 + nothing) = 0 for a proxy with no positive
          ne[c] = pa_neg_lse(row, y, B, int32_t(c), a, m, lw);
          if (!with_grad) continue;
          for (int64_t k = by.off[c]; k < by.off[c + 1]; ++k)  // each example is in one row
            wp[by.idx[k]] = pa_pos_grad(row[by.idx[k]], a, m, po[c]);
          pa_grad_row(row, y, B, int32_t(c), a, m, T(0), T(1), po[c], ne[c], lw);
        }
      });
      if (!with_grad) continue;
      at::Tensor dpc = dp.narrow(0, start, len);
      at::mm_out(dpc, st, x);
      dx.addmm_(st.t(), pc);
    }
  });
  return {pos, neg, w, dx, dp};
}

std::tuple<at::Tensor, at::Tensor> pa_bwd(
    const at::Tensor& grad_pos_, const at::Tensor& grad_neg_, const at::Tensor& x_,
    const at::Tensor& p_, const at::Tensor& labels_, const at::Tensor& lw_, const at::Tensor& pos_,
    const at::Tensor& neg_, double alpha, double margin, int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  const at::Tensor lwc = checked_log_w(lw_, x_);
  const int64_t C = p_.size(0);
  check_vec(grad_pos_, C, "grad_pos");
  check_vec(grad_neg_, C, "grad_neg");
  check_vec(pos_, C, "pos");
  check_vec(neg_, C, "neg");
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  auto gp = grad_pos_.to(x.scalar_type()).contiguous(), gn = grad_neg_.to(x.scalar_type()).contiguous();
  auto lp = pos_.to(x.scalar_type()).contiguous(), ln = neg_.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0);
  at::Tensor dx = at::zeros_like(x), dp = at::zeros_like(p);
  const at::Tensor y32 = labels.to(at::kInt).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_bwd_cpu", [&] {
    using T = scalar_t;
    const int32_t* y = y32.data_ptr<int32_t>();
    const T *gpp = gp.data_ptr<T>(), *gnp = gn.data_ptr<T>();
    const T *lpp = lp.data_ptr<T>(), *lnp = ln.data_ptr<T>();
    const T a = T(alpha), m = T(margin);
    const T* lw = lw_ptr<T>(lwc);
    at::Tensor buf = at::empty({std::min(chunk, C), B}, x.options());
    for (int64_t start = 0; start < C; start += chunk) {
      const int64_t len = std::min(chunk, C - start);
      at::Tensor pc = p.narrow(0, start, len);
      at::Tensor st = buf.narrow(0, 0, len);  // a row prefix: contiguous
      at::mm_out(st, pc, x.t());  // becomes Gᵀ in place
      T* s = st.data_ptr<T>();
      at::parallel_for(0, len, row_grain(B), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = start + r;
          pa_grad_row(s + r * B, y, B, int32_t(c), a, m, gpp[c], gnp[c], lpp[c], lnp[c], lw);
        }
      });
      dp.narrow(0, start, len).addmm_(st, x);
      dx.addmm_(st.t(), pc);
    }
  });
  return {dx, dp};
}


// dx, dp from proxy_anchor_grad_fwd's parts: the positive side from its weights and the
// per-proxy grad_pos (O(B·D)); the negative side is its stored products times grad_neg when
// grad_neg is one value for every proxy (the Divisor, Mean and Sum reducers of the per-proxy
// terms), else the whole gradient is recomputed as pa_bwd does.
std::tuple<at::Tensor, at::Tensor> pa_grad_bwd(
    const at::Tensor& grad_pos_, const at::Tensor& grad_neg_, const at::Tensor& x_,
    const at::Tensor& p_, const at::Tensor& labels_, const at::Tensor& pos_,
    const at::Tensor& neg_, const at::Tensor& w_, const at::Tensor& dx_neg,
    const at::Tensor& dp_neg, double alpha, double margin, int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  const int64_t B = x_.size(0), C = p_.size(0), D = x_.size(1);
  check_vec(grad_pos_, C, "grad_pos");
  check_vec(grad_neg_, C, "grad_neg");
  check_vec(w_, B, "w");
  TORCH_CHECK(dx_neg.sizes() == x_.sizes() && dp_neg.sizes() == p_.sizes() &&
                  dx_neg.scalar_type() == x_.scalar_type() &&
                  dp_neg.scalar_type() == x_.scalar_type(),
              "dx_neg, dp_neg must have x's and p's shapes and x's dtype");
  const at::Tensor gn = grad_neg_.to(x_.scalar_type()).contiguous();
  const bool uniform = C == 0 || (gn == gn[0]).all().item<bool>();
  if (!uniform)
    return pa_bwd(grad_pos_, grad_neg_, x_, p_, labels_, at::Tensor(), pos_, neg_, alpha,
                  margin, chunk);
  auto x = x_.contiguous(), p = p_.contiguous();
  at::Tensor dx = C ? dx_neg * gn[0] : at::zeros_like(x), dp = C ? dp_neg * gn[0] : at::zeros_like(p);
  const at::Tensor gp = grad_pos_.to(x.scalar_type()).contiguous(), w = w_.contiguous();
  const at::Tensor y32 = labels_.to(at::kInt).contiguous();
  const ByClass by(y32.data_ptr<int32_t>(), B, C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_grad_bwd_cpu", [&] {
    using T = scalar_t;
    const int32_t* y = y32.data_ptr<int32_t>();
    const T *gpp = gp.data_ptr<T>(), *wp = w.data_ptr<T>(), *xp = x.data_ptr<T>(),
            *pp = p.data_ptr<T>();
    T *dxp = dx.data_ptr<T>(), *dpp = dp.data_ptr<T>();
    // each proxy's examples by class: a proxy's row of dp and its examples' rows of dx are
    // written by one task
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t k = by.off[c]; k < by.off[c + 1]; ++k) {
          const int64_t j = by.idx[k];
          const T g = gpp[c] * wp[j];
          if (g == T(0)) continue;
          for (int64_t d = 0; d < D; ++d) {
            dxp[j * D + d] += g * pp[c * D + d];
            dpp[c * D + d] += g * xp[j * D + d];
          }
        }
    });
  });
  return {dx, dp};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> proxy_anchor_grad_fwd_cpu(
    const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, double alpha,
    double margin, int64_t chunk) {
  return pa_fwd(x, p, labels, at::Tensor(), alpha, margin, chunk, true);
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_grad_bwd_cpu(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& p, const at::Tensor& labels, const at::Tensor& pos, const at::Tensor& neg,
    const at::Tensor& w, const at::Tensor& dx_neg, const at::Tensor& dp_neg, double alpha,
    double margin, int64_t chunk) {
  return pa_grad_bwd(grad_pos, grad_neg, x, p, labels, pos, neg, w, dx_neg, dp_neg, alpha,
                     margin, chunk);
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_fwd_cpu(const at::Tensor& x, const at::Tensor& p,
                                                        const at::Tensor& labels, double alpha,
                                                        double margin, int64_t chunk) {
  auto out = pa_fwd(x, p, labels, at::Tensor(), alpha, margin, chunk, false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_bwd_cpu(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& p, const at::Tensor& labels, const at::Tensor& pos, const at::Tensor& neg,
    double alpha, double margin, int64_t chunk) {
  return pa_bwd(grad_pos, grad_neg, x, p, labels, at::Tensor(), pos, neg, alpha, margin, chunk);
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_weighted_fwd_cpu(
    const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, const at::Tensor& log_w,
    double alpha, double margin, int64_t chunk) {
  auto out = pa_fwd(x, p, labels, log_w, alpha, margin, chunk, false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_weighted_bwd_cpu(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& p, const at::Tensor& labels, const at::Tensor& log_w, const at::Tensor& pos,
    const at::Tensor& neg, double alpha, double margin, int64_t chunk) {
  return pa_bwd(grad_pos, grad_neg, x, p, labels, log_w, pos, neg, alpha, margin, chunk);
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Proxy-anchor loss of unit embeddings x against unit proxies p, streamed over p in chunks
  // of `chunk` proxies: per proxy, log(1 + Σ_pos e^{−α(s−δ)}) and log(1 + Σ_neg e^{α(s+δ)}).
  m.def("proxy_anchor_fwd(Tensor x, Tensor p, Tensor labels, float alpha, float margin, "
        "int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("proxy_anchor_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor p, Tensor labels, "
        "Tensor pos, Tensor neg, float alpha, float margin, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  // the same with log_w (B,) added to every exponent of each example (PML's indices_tuple
  // weights, w − 1); CPU only
  m.def("proxy_anchor_weighted_fwd(Tensor x, Tensor p, Tensor labels, Tensor log_w, "
        "float alpha, float margin, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("proxy_anchor_weighted_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor p, "
        "Tensor labels, Tensor log_w, Tensor pos, Tensor neg, float alpha, float margin, "
        "int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // The same terms with the gradient's parts for the backward (CPU only; the module takes it
  // when a gradient is wanted): (pos, neg, w: the positive entries' ∂pos/∂s per example,
  // dx_neg, dp_neg: the negative terms' gradient at unit upstream gradient), and its
  // backward from them.
  m.def("proxy_anchor_grad_fwd(Tensor x, Tensor p, Tensor labels, float alpha, float margin, "
        "int chunk) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("proxy_anchor_grad_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor p, "
        "Tensor labels, Tensor pos, Tensor neg, Tensor w, Tensor dx_neg, Tensor dp_neg, "
        "float alpha, float margin, int chunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("proxy_anchor_grad_fwd", &proxy_anchor_grad_fwd_cpu);
  m.impl("proxy_anchor_grad_bwd", &proxy_anchor_grad_bwd_cpu);
  m.impl("proxy_anchor_fwd", &proxy_anchor_fwd_cpu);
  m.impl("proxy_anchor_bwd", &proxy_anchor_bwd_cpu);
  m.impl("proxy_anchor_weighted_fwd", &proxy_anchor_weighted_fwd_cpu);
  m.impl("proxy_anchor_weighted_bwd", &proxy_anchor_weighted_bwd_cpu);
}

}  // namespace metrix_ops
