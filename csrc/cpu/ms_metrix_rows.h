// The host side of the multi-similarity Metrix ops (the batch against itself,
// ms_metrix_self_cpu.cpp, and against references, ms_metrix_refs_cpu.cpp): the fold's fixed
// shifts, the constants of a block side, and the per-anchor mixed rows from the folded sums.
#pragma once

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "cpu/ms_metrix_kernels.h"

namespace metrix_ops {

// the ops' outputs: clean rows and their two lse's, mixed rows and their two normalisers
using SixTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

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


}  // namespace metrix_ops
