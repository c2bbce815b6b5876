// A branch-free fp32 exp for the per-element passes of the fused CPU losses, where scalar
// std::exp is the bottleneck. Written once over "lane" types: plain float, or a GCC vector
// of floats (Lanes<W>::F), so the same code runs per element and W elements at a time; the
// vector width comes from the target the caller is compiled for (see cpu/ms_simd.cpp).
//
// Method: n = round(x·log2 e), r = x − n·ln2 with ln2 split in a short hi part (n·hi is
// exact) and a lo part, e^r by a degree-6 polynomial on |r| ≤ ln2/2 (the classic Cephes
// expf coefficients), then 2^n built from exponent bits. Error ≤ 2 ulp over the whole range
// (tests/test_fast_exp.py measures it). Edge cases as std::exp: NaN → NaN, x > ln(FLT_MAX)
// → +inf, except that results below FLT_MIN are flushed to 0: subnormals would take the
// slow microcode path and are below what the sums they feed can resolve anyway.
#pragma once

#include <cstdint>
#include <cstring>

// Vectors wider than the baseline ISA appear only inside functions compiled for a wider
// target, where everything here is inlined; GCC still notes the ABI of the template itself.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace metrix_ops {

template <int W>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
};

// The lanes of a W-lane comparison result (0 or −1 per lane) as the bits of an integer
// (lane l: bit l), by halving OR-reductions of the lanes' own bits.
template <int W, class I>
inline __attribute__((always_inline)) uint32_t lane_bits(I v) {
  if constexpr (W == 16) {
    const I bit = {1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7,
                   1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15};
    const I b = v & bit;
    const auto h8 = __builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7) |
                    __builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15);
    const auto h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) |
                    __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
    const auto h2 = __builtin_shufflevector(h4, h4, 0, 1) | __builtin_shufflevector(h4, h4, 2, 3);
    return uint32_t(h2[0] | h2[1]);
  } else if constexpr (W == 8) {
    const I bit = {1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7};
    const I b = v & bit;
    const auto h4 = __builtin_shufflevector(b, b, 0, 1, 2, 3) |
                    __builtin_shufflevector(b, b, 4, 5, 6, 7);
    const auto h2 = __builtin_shufflevector(h4, h4, 0, 1) | __builtin_shufflevector(h4, h4, 2, 3);
    return uint32_t(h2[0] | h2[1]);
  } else {
    static_assert(W == 4, "lanes: 4, 8 or 16");
    const I bit = {1 << 0, 1 << 1, 1 << 2, 1 << 3};
    const I b = v & bit;
    const auto h2 = __builtin_shufflevector(b, b, 0, 1) | __builtin_shufflevector(b, b, 2, 3);
    return uint32_t(h2[0] | h2[1]);
  }
}

// a > b ? a : b and a < b ? a : b, lane by lane, as one maxps/minps on x86 with AVX (VEX
// encoding: the 8- and 16-lane vectors of the AVX2 and AVX-512 kernels). GCC (12) turns the
// same select inside these target-less templates into a compare and a blend, two
// operations, in the AVX-512 code (see cpu/ms_simd.cpp); in a per-candidate exp that does two
// clamps it was 4 of ~44 operations. NaN in either gives b, as the select does.
template <class F>
inline __attribute__((always_inline)) F lane_max(F a, F b) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (sizeof(F) >= 32) {
    F r;
    asm("vmaxps %2, %1, %0" : "=v"(r) : "v"(a), "v"(b));
    return r;
  }
#endif
  return a > b ? a : b;
}
template <class F>
inline __attribute__((always_inline)) F lane_min(F a, F b) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (sizeof(F) >= 32) {
    F r;
    asm("vminps %2, %1, %0" : "=v"(r) : "v"(a), "v"(b));
    return r;
  }
#endif
  return a < b ? a : b;
}

// m ? a : b lane by lane, m one comparison's result. GCC (12) builds a comparison inside
// these target-less templates with the baseline ISA's mask type, and once inlined into an
// AVX-512 function it lowers two such masks combined (m1 & m2, m1 | m2, or two selects of
// one value that it merges into one) a lane at a time: a vcomiss and a seta per lane, ~1000
// scalar operations in a fold kernel. A select on one comparison lowers to a vector compare
// and a blend; the empty asm on its result keeps GCC from merging it with the next select.
// So in code that runs 16 lanes: one comparison per select, combined through lane_pick.
template <class M, class F>
inline __attribute__((always_inline)) F lane_pick(M m, F a, F b) {
  F r = m ? a : b;
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (sizeof(F) == 64) asm("" : "+v"(r));
#endif
  return r;
}

namespace fexp {

// Reinterpreting bits: a cast for GCC vectors, memcpy for scalars.
template <class I, class F>
inline __attribute__((always_inline)) I as_int(F x) {
  I i;
  static_assert(sizeof(I) == sizeof(F), "lane types must match");
  std::memcpy(&i, &x, sizeof(I));
  return i;
}
template <class F, class I>
inline __attribute__((always_inline)) F as_float(I i) {
  F x;
  std::memcpy(&x, &i, sizeof(F));
  return x;
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;       // 9 significant bits: n·kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;    // ln 2 − kLn2Hi
constexpr float kRound = 12582912.0f;        // 1.5·2^23: adding it rounds to an integer
constexpr float kOverflow = 88.72283905206835f;  // ln(FLT_MAX)
constexpr float kUnderflow = -87.33654475055310898657f;  // ln(FLT_MIN)
constexpr float kFltMin = 1.17549435e-38f;

}  // namespace fexp

// e^x by the polynomial and exponent bits, for x already known to lie in
// [kUnderflow, kOverflow] (no range handling: outside it the exponent field wraps).
template <class F, class I>
inline __attribute__((always_inline)) F fast_exp_in_range(F x) {
  using namespace fexp;
  const F zero{};  // broadcasts that work for scalars and vectors alike
  const F one = zero + 1.0f;
  // n = round(x·log2 e) by the 1.5·2^23 trick: its low mantissa bits are n.
  const F t = x * kLog2e + kRound;
  const F n = t - kRound;
  const I ni = as_int<I>(t) - as_int<I>(zero + kRound);
  const F r = (x - n * kLn2Hi) - n * kLn2Lo;
  const F z = r * r;
  F p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + one;
  // 2^n as 2^(n>>1)·2^(n−(n>>1)): n reaches 128 just below ln(FLT_MAX) and −126 just above
  // ln(FLT_MIN), neither of which is a normal exponent field on its own.
  const I n1 = ni >> 1;
  const I n2 = ni - n1;
  return p * as_float<F>((n1 + 127) << 23) * as_float<F>((n2 + 127) << 23);
}

// e^x with x clamped into [ln FLT_MIN, ln FLT_MAX] first: never 0 or inf, two operations
// instead of fast_exp's range handling, for sums whose callers bound or check the result.
template <class F, class I>
inline __attribute__((always_inline)) F fast_exp_clamped(F x) {
  using namespace fexp;
  // NaN passes through (lane_max and lane_min return their second operand on NaN)
  return fast_exp_in_range<F, I>(lane_min(F{} + kOverflow, lane_max(F{} + kUnderflow, x)));
}

// e^x for F = float (I = int32_t) or F = Lanes<W>::F (I = Lanes<W>::I).
template <class F, class I>
inline __attribute__((always_inline)) F fast_exp(F x) {
  using namespace fexp;
  const F zero{};
  // Lanes that will flush or overflow compute the clamped exp first: keeps n in range and
  // every intermediate normal (no subnormal arithmetic, no int overflow); NaN passes through.
  // One comparison per select (lane_pick): the AVX-512 kernels stay vector code.
  F y = fast_exp_clamped<F, I>(x);
  y = lane_pick(y < kFltMin, zero, y);  // the one value at the underflow boundary
  y = lane_pick(x < kUnderflow, zero, y);
  return lane_pick(x > kOverflow, zero + __builtin_inff(), y);
}

inline float fast_exp(float x) { return fast_exp<float, int32_t>(x); }

}  // namespace metrix_ops
