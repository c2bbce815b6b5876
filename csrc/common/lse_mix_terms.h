// The per-candidate terms of a Metrix loss whose mixed term is a function of two per-anchor
// log-sum-exps, lse⁺(a) = log Σ_v e^{pos(s̃_v)} and lse⁻(a) = log Σ_v e^{neg(s̃_v)} over a's
// candidates v (CircleLoss, GeneralizedLiftedStructureLoss: common/circle_metrix.h,
// common/lifted_metrix.h): the two exponents at a candidate's cosine s̃ and their slopes
// ∂/∂s̃, over a lane type F (a scalar, or a GCC vector on the CPU).
#pragma once

// Forced inline on the host as well: the CPU kernels call these from per-ISA entry points
// (cpu/lse_mix_simd.cpp) with GCC vector lanes, which must be compiled for the caller's target.
#if defined(__CUDACC__)
#define MO_LMX __host__ __device__ __forceinline__
#else
#define MO_LMX inline __attribute__((always_inline))
#endif

namespace metrix_ops {

template <typename F>
struct LseMixTerms {
  F pos, neg;    // the exponents
  F dpos, dneg;  // their slopes ∂/∂s̃ (what the gradient differentiates)
};

}  // namespace metrix_ops
