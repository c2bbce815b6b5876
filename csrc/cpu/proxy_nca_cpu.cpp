// Fused ProxyNCA loss on the CPU: unit embeddings x (B×D) against unit proxies p (C×D),
// streaming S = x pᵀ in chunks of examples; never B×C.
//
// Each example's softmax runs over all proxies, so chunking examples keeps every row's
// log-sum-exp inside one tile. Forward returns per-example lse − own logit and the lse;
// backward recomputes each tile, turns it into the tile of G = ∂L/∂S in place, then
// dx_c = G_c p and dp += G_cᵀ x_c. With a gradient wanted the module takes
// proxy_nca_grad_fwd, which does that in the forward (three products, not four).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/lse_acc.h"
#include "common/proxy_nca.h"
#include "cpu/op_checks.h"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

// the rows [start, start + len) of S, the tile s (len × C): each example's loss term and
// log-sum-exp
template <typename T>
void nca_rows_tile(const T* s, int64_t start, int64_t len, int64_t C, const int64_t* y, T sc,
                   int64_t kind, T* out, T* lo) {
  at::parallel_for(0, len, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = s + r * C;
      OnlineLse<T> acc = OnlineLse<T>::empty();
      for (int64_t c = 0; c < C; ++c) acc.push(nca_logit(row[c], sc, kind));
      const int64_t i = start + r;
      lo[i] = acc.value();
      out[i] = nca_row_loss(acc, nca_logit(row[y[i]], sc, kind));
    }
  });
}

// rows [start, start + len) of S, the tile s (len × C), become those of G = ∂L/∂S in place:
// upstream gradient g[i] per example (null: 1), lse[i] its finished log-sum-exp
template <typename T>
void nca_grad_tile(T* s, int64_t start, int64_t len, int64_t C, const int64_t* y, const T* g,
                   const T* lse, T sc, int64_t kind) {
  at::parallel_for(0, len, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = start + r;
      const T gi = g ? g[i] : T(1);
      T* row = s + r * C;
      for (int64_t c = 0; c < C; ++c) row[c] = gi * nca_grad(row[c], c == y[i], sc, kind, lse[i]);
    }
  });
}

}  // namespace

namespace {

// The forward: per example its loss term and log-sum-exp, and with_grad the gradient at
// unit upstream gradient (proxy_nca_grad_fwd; the module takes it when a gradient is wanted):
// each tile, once its rows' log-sum-exps are done, is turned into G in place and
// dx_c = G_c p, dp += G_cᵀ x_c follow: three products in all, where forward plus
// proxy_nca_bwd take four (the backward recomputes each tile).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nca_forward(
    const at::Tensor& x_, const at::Tensor& p_, const at::Tensor& labels_, double scale,
    int64_t kind, int64_t chunk, bool with_grad) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  TORCH_CHECK(kind == kNcaCosine || kind == kNcaSquaredL2, "kind must be 0 or 1, got ", kind);
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  at::Tensor rows = at::zeros({B}, x.options()), lse = at::zeros({B}, x.options());
  at::Tensor dx = with_grad ? at::zeros_like(x) : at::Tensor();
  at::Tensor dp = with_grad ? at::zeros_like(p) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_fwd_cpu", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    T *out = rows.data_ptr<T>(), *lo = lse.data_ptr<T>();
    const T sc = T(scale);
    at::Tensor buf = at::empty({std::min(chunk, B), C}, x.options());  // one tile, reused
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      at::Tensor xc = x.narrow(0, start, len);
      at::Tensor st = buf.narrow(0, 0, len);  // a row prefix: contiguous
      at::mm_out(st, xc, p.t());
      T* s = st.data_ptr<T>();
      nca_rows_tile(s, start, len, C, y, sc, kind, out, lo);
      if (!with_grad) continue;
      nca_grad_tile(s, start, len, C, y, static_cast<const T*>(nullptr), lo, sc, kind);
      at::Tensor dxc = dx.narrow(0, start, len);
      at::mm_out(dxc, st, p);
      dp.addmm_(st.t(), xc);
    }
  });
  return {rows, lse, dx, dp};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> proxy_nca_fwd_cpu(const at::Tensor& x, const at::Tensor& p,
                                                     const at::Tensor& labels, double scale,
                                                     int64_t kind, int64_t chunk) {
  auto out = nca_forward(x, p, labels, scale, kind, chunk, false);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor> proxy_nca_bwd_cpu(const at::Tensor& grad_rows_,
                                                     const at::Tensor& x_, const at::Tensor& p_,
                                                     const at::Tensor& labels_,
                                                     const at::Tensor& lse_, double scale,
                                                     int64_t kind, int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  TORCH_CHECK(kind == kNcaCosine || kind == kNcaSquaredL2, "kind must be 0 or 1, got ", kind);
  const int64_t B = x_.size(0), C = p_.size(0);
  check_vec(grad_rows_, B, "grad_rows");
  check_vec(lse_, B, "lse");
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  auto g = grad_rows_.to(x.scalar_type()).contiguous(), lse = lse_.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::zeros_like(x), dp = at::zeros_like(p);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_nca_bwd_cpu", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    const T *gp = g.data_ptr<T>(), *lp = lse.data_ptr<T>();
    const T sc = T(scale);
    at::Tensor buf = at::empty({std::min(chunk, B), C}, x.options());
    for (int64_t start = 0; start < B; start += chunk) {
      const int64_t len = std::min(chunk, B - start);
      at::Tensor xc = x.narrow(0, start, len);
      at::Tensor st = buf.narrow(0, 0, len);  // a row prefix: contiguous
      at::mm_out(st, xc, p.t());  // becomes G in place
      T* s = st.data_ptr<T>();
      nca_grad_tile(s, start, len, C, y, gp, lp, sc, kind);
      at::Tensor dxc = dx.narrow(0, start, len);
      at::mm_out(dxc, st, p);
      dp.addmm_(st.t(), xc);
    }
  });
  return {dx, dp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> proxy_nca_grad_fwd_cpu(
    const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels, double scale,
    int64_t kind, int64_t chunk) {
  return nca_forward(x, p, labels, scale, kind, chunk, true);
}

// dx, dp from proxy_nca_grad_fwd's: scaled when grad_rows is one value for every example
// (the Mean and Sum reducers), else recomputed (proxy_nca_bwd: dp needs each row's weight
// inside its product)
std::tuple<at::Tensor, at::Tensor> proxy_nca_grad_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& p,
    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& dx1,
    const at::Tensor& dp1, double scale, int64_t kind, int64_t chunk) {
  check_proxy_inputs(x, p, labels, chunk);
  check_vec(grad_rows, x.size(0), "grad_rows");
  TORCH_CHECK(dx1.sizes() == x.sizes() && dp1.sizes() == p.sizes() &&
                  dx1.scalar_type() == x.scalar_type() && dp1.scalar_type() == x.scalar_type(),
              "dx1, dp1 must have x's and p's shapes and x's dtype");
  const at::Tensor g = grad_rows.to(x.scalar_type());
  if (x.size(0) > 0 && !(g == g[0]).all().item<bool>())
    return proxy_nca_bwd_cpu(grad_rows, x, p, labels, lse, scale, kind, chunk);
  if (x.size(0) == 0) return {at::zeros_like(x), at::zeros_like(p)};
  return {dx1 * g[0], dp1 * g[0]};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // ProxyNCA rows of unit embeddings x against unit proxies p, streamed over x in chunks of
  // `chunk` rows: per example, logsumexp_c(logit) − logit of its own proxy, and the
  // logsumexp. kind 0: logit = scale·s (cosine); 1: logit = −scale·(2 − 2s) (squared L2).
  m.def("proxy_nca_fwd(Tensor x, Tensor p, Tensor labels, float scale, int kind, int chunk) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("proxy_nca_bwd(Tensor grad_rows, Tensor x, Tensor p, Tensor labels, Tensor lse, "
        "float scale, int kind, int chunk) -> (Tensor, Tensor)",
        METRIX_HOST_READS);
  // The same rows with their gradient at unit upstream gradient (rows, lse, dx1, dp1; CPU
  // only), and the backward from them.
  m.def("proxy_nca_grad_fwd(Tensor x, Tensor p, Tensor labels, float scale, int kind, "
        "int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("proxy_nca_grad_bwd(Tensor grad_rows, Tensor x, Tensor p, Tensor labels, Tensor lse, "
        "Tensor dx1, Tensor dp1, float scale, int kind, int chunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("proxy_nca_fwd", &proxy_nca_fwd_cpu);
  m.impl("proxy_nca_bwd", &proxy_nca_bwd_cpu);
  m.impl("proxy_nca_grad_fwd", &proxy_nca_grad_fwd_cpu);
  m.impl("proxy_nca_grad_bwd", &proxy_nca_grad_bwd_cpu);
}

}  // namespace metrix_ops
