// The inner loop of the Embedding Expansion sweeps (ee_losses_cpu.cpp): for one anchor i and
// a tile of negative points q, the hard-negative-pair similarity
//
//     ŝ(i, q) = max_{a ∈ A_i} s(a, q),   s(a, q) = (λ_a H[a_u, q] + μ_a H[a_w, q]) / (‖a‖‖q‖),
//
// and the winning a (the earliest on ties), where a = 0 is x_i itself (s = H[i, q] / ‖q‖).
// This is B·|A_i|·P evaluations per sweep, the EE losses' whole cost, so it is written over
// lane types and compiled per x86 level (ee_simd.cpp), as the MS kernels are: lanes run
// over q, the loop over a is inside, so best/arg stay in registers.
//
// Rounding is the reference's (reference/expansion_points.py): two products, a sum, then a
// division by the product of the norms; no FMA contraction (ee_simd.cpp turns it off), so
// exact ties (duplicate rows, a segment's points on x_i) fall as they do there.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/fast_exp.h"

namespace metrix_ops {

// One anchor's side A_i, structure of arrays: the H rows of each a's endpoints (for a = 0
// both are x_i's row), its weights and its norm.
template <typename T>
struct EeSideRows {
  const T* const* hu;
  const T* const* hw;
  const T* lam;
  const T* mu;
  const T* norm;
  int64_t count;
};

// ŝ over the nt columns into best, the winning a (as T, exact for any side size in use)
// into arg; qn: the columns' norms.
template <typename T>
using EeClosestFn = void (*)(const EeSideRows<T>& side, const T* qn, int64_t nt, T* best,
                             T* arg);

// The kernel of the level in use (METRIX_OPS_SIMD, as ms_kernels_f32; ee_simd.cpp).
EeClosestFn<float> ee_closest_f32();
EeClosestFn<double> ee_closest_f64();
template <typename T>
EeClosestFn<T> ee_closest();
template <>
inline EeClosestFn<float> ee_closest<float>() { return ee_closest_f32(); }
template <>
inline EeClosestFn<double> ee_closest<double>() { return ee_closest_f64(); }

// The body, forced inline into the per-level entry points. W = 1: plain scalars of T;
// W > 1: GCC vectors of W floats.
template <typename T, int W>
struct EeClosestKernel {
  static inline __attribute__((always_inline)) void run(const EeSideRows<T>& sd, const T* qn,
                                                        int64_t nt, T* best, T* arg) {
    int64_t c = 0;
    if constexpr (W > 1) {
      using F = typename Lanes<W>::F;
      for (; c + W <= nt; c += W) {
        F q, h;
        std::memcpy(&q, qn + c, sizeof(F));
        std::memcpy(&h, sd.hu[0] + c, sizeof(F));
        F b = h / q, g = F{};
        for (int64_t a = 1; a < sd.count; ++a) {
          F hu, hw;
          std::memcpy(&hu, sd.hu[a] + c, sizeof(F));
          std::memcpy(&hw, sd.hw[a] + c, sizeof(F));
          const F s = (sd.lam[a] * hu + sd.mu[a] * hw) / (sd.norm[a] * q);
          const auto win = s > b;  // strict: the earliest a keeps a tie
          b = win ? s : b;
          g = win ? F{} + float(a) : g;
        }
        std::memcpy(best + c, &b, sizeof(F));
        std::memcpy(arg + c, &g, sizeof(F));
      }
    }
    for (; c < nt; ++c) {  // the tail (all of it for W = 1), the same arithmetic per lane
      T b = sd.hu[0][c] / qn[c], g = T(0);
      for (int64_t a = 1; a < sd.count; ++a) {
        const T s = (sd.lam[a] * sd.hu[a][c] + sd.mu[a] * sd.hw[a][c]) / (sd.norm[a] * qn[c]);
        const bool win = s > b;
        b = win ? s : b;
        g = win ? T(a) : g;
      }
      best[c] = b, arg[c] = g;
    }
  }
};

}  // namespace metrix_ops
