// ProxyNCA per-element math (PML's form with unit embeddings and proxies, s their cosine
// similarity), shared by host and device code. Each example's loss is the softmax
// cross-entropy over the proxies' logits, lse − logit of its own proxy.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/row_state.h"  // MO_HD

namespace metrix_ops {

// Which distance the logits come from: CosineSimilarity (logit = scale·s) or PML's default
// LpDistance(power=2), whose squared distance of unit vectors is 2 − 2s (logit = −scale·d²).
enum ProxyNcaKind : int64_t { kNcaCosine = 0, kNcaSquaredL2 = 1 };

template <typename T>
MO_HD T nca_logit(T s, T scale, int64_t kind) {
  return kind == kNcaCosine ? scale * s : -scale * (T(2) - T(2) * s);
}

// d(logit)/ds: constant in s for both kinds
template <typename T>
MO_HD T nca_dlogit(T scale, int64_t kind) { return kind == kNcaCosine ? scale : T(2) * scale; }

// ∂(row loss)/∂s_c = dlogit · (softmax_c − [c is the own proxy]), softmax_c = e^{logit − lse}
template <typename T>
MO_HD T nca_grad(T s, bool own, T scale, int64_t kind, T lse) {
  const T sm = std::exp(nca_logit(s, scale, kind) - lse);
  return nca_dlogit(scale, kind) * (own ? sm - T(1) : sm);
}

// The row loss lse − own as (max − own) + log(sum) of the row's online log-sum-exp: for a
// row whose own logit is the largest that is log(1 + t), t the other proxies' mass, with no
// cancellation against the logits' magnitude, so it is exactly 0 only when 1 + t rounds to 1,
// as PML's −log of the own proxy's softmax probability is (AvgNonZero leaves such rows out).
// lse − own would round to 0 whenever t is below half an ulp of the logits: a row PML
// counts (e.g. t = 1.3e-7 at logits near −6 in fp32).
template <typename T>
MO_HD T nca_row_loss(const OnlineLse<T>& acc, T own) {
  return (acc.m - own) + std::log(acc.s);
}

}  // namespace metrix_ops
