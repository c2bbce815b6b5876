// Fused proxy-anchor loss on the CPU: unit embeddings x (B×D) against unit proxies p (C×D),
// streaming Sᵀ = p xᵀ in chunks of proxies; never B×C.
//
// The proxies are the anchors, so each proxy's two log-sum-exps run over the whole batch:
// chunking proxies keeps every such sum inside one chunk, as one contiguous row of the tile
// (no cross-chunk merging, no column scans). Forward returns the per-proxy terms, which are
// also the log-sum-exps the backward needs; backward recomputes each tile, turns it into the
// tile of Gᵀ = (∂L/∂S)ᵀ in place, then dp_c = Gᵀ_c x and dx += G_c p_c.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/proxy_anchor.h"
#include "cpu/op_checks.h"

namespace metrix_ops {

std::tuple<at::Tensor, at::Tensor> proxy_anchor_fwd_cpu(const at::Tensor& x_, const at::Tensor& p_,
                                                        const at::Tensor& labels_, double alpha,
                                                        double margin, int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
  auto x = x_.contiguous(), p = p_.contiguous(), labels = labels_.contiguous();
  const int64_t B = x.size(0), C = p.size(0);
  at::Tensor pos = at::zeros({C}, x.options()), neg = at::zeros({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_fwd_cpu", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    T* po = pos.data_ptr<T>();
    T* ne = neg.data_ptr<T>();
    const T a = T(alpha), m = T(margin);
    for (int64_t start = 0; start < C; start += chunk) {
      const int64_t len = std::min(chunk, C - start);
      at::Tensor st = at::mm(p.narrow(0, start, len), x.t()).contiguous();  // len × B
      const T* s = st.data_ptr<T>();
      at::parallel_for(0, len, row_grain(B), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = start + r;
          const T* row = s + r * B;
          OnlineLse<T> lp = lse_with_one<T>(), ln = lse_with_one<T>();
          for (int64_t j = 0; j < B; ++j) {
            if (y[j] == c) lp.push(pa_pos_arg(row[j], a, m));
            else ln.push(pa_neg_arg(row[j], a, m));
          }
          po[c] = lp.value();  // log(1 + nothing) = 0 for a proxy with no positive
          ne[c] = ln.value();
        }
      });
    }
  });
  return {pos, neg};
}

std::tuple<at::Tensor, at::Tensor> proxy_anchor_bwd_cpu(
    const at::Tensor& grad_pos_, const at::Tensor& grad_neg_, const at::Tensor& x_,
    const at::Tensor& p_, const at::Tensor& labels_, const at::Tensor& pos_,
    const at::Tensor& neg_, double alpha, double margin, int64_t chunk) {
  check_proxy_inputs(x_, p_, labels_, chunk);
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "proxy_anchor_bwd_cpu", [&] {
    using T = scalar_t;
    const int64_t* y = labels.data_ptr<int64_t>();
    const T *gpp = gp.data_ptr<T>(), *gnp = gn.data_ptr<T>();
    const T *lpp = lp.data_ptr<T>(), *lnp = ln.data_ptr<T>();
    const T a = T(alpha), m = T(margin);
    for (int64_t start = 0; start < C; start += chunk) {
      const int64_t len = std::min(chunk, C - start);
      at::Tensor pc = p.narrow(0, start, len);
      at::Tensor st = at::mm(pc, x.t()).contiguous();  // becomes Gᵀ in place
      T* s = st.data_ptr<T>();
      at::parallel_for(0, len, row_grain(B), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = start + r;
          T* row = s + r * B;
          for (int64_t j = 0; j < B; ++j)
            row[j] = pa_grad(row[j], y[j] == c, a, m, gpp[c], gnp[c], lpp[c], lnp[c]);
        }
      });
      dp.narrow(0, start, len).addmm_(st, x);
      dx.addmm_(st.t(), pc);
    }
  });
  return {dx, dp};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // Proxy-anchor loss of unit embeddings x against unit proxies p, streamed over p in chunks
  // of `chunk` proxies: per proxy, log(1 + Σ_pos e^{−α(s−δ)}) and log(1 + Σ_neg e^{α(s+δ)}).
  m.def("proxy_anchor_fwd(Tensor x, Tensor p, Tensor labels, float alpha, float margin, "
        "int chunk) -> (Tensor, Tensor)");
  m.def("proxy_anchor_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor p, Tensor labels, "
        "Tensor pos, Tensor neg, float alpha, float margin, int chunk) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("proxy_anchor_fwd", &proxy_anchor_fwd_cpu);
  m.impl("proxy_anchor_bwd", &proxy_anchor_bwd_cpu);
}

}  // namespace metrix_ops
