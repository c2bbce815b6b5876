// The fp32 kernels of lse_mix_kernels.h (Circle and generalized-lifted Metrix) compiled for
// the three x86 levels of ms_simd.cpp, picked at run time as ms_kernels_f32 picks its own
// (same METRIX_OPS_SIMD override, same level), and the scalar fp64 ones.
#include <cstring>

#include "cpu/lse_mix_kernels.h"
#include "cpu/ms_kernels.h"

namespace metrix_ops {

namespace {

#define MO_LSE_LEVEL(NAME, TARGET, W)                                                       \
  TARGET void circle_fold_##NAME(const CircleMixBlock<float>& b, int64_t a0, int64_t a1,    \
                                 OnlineLse<float>* pos, OnlineLse<float>* neg) {            \
    LseMixKernel<float, W, CircleLanes>::fold(b, a0, a1, pos, neg);                         \
  }                                                                                         \
  TARGET void circle_grad_##NAME(const CircleMixBlock<float>& b, int64_t a0, int64_t a1) {  \
    LseMixKernel<float, W, CircleLanes>::grad(b, a0, a1);                                   \
  }                                                                                         \
  TARGET void lifted_fold_##NAME(const LiftedMixBlock<float>& b, int64_t a0, int64_t a1,    \
                                 OnlineLse<float>* pos, OnlineLse<float>* neg) {            \
    LseMixKernel<float, W, LiftedLanes, LiftedCleanLanes>::fold(b, a0, a1, pos, neg);       \
  }                                                                                         \
  TARGET void lifted_grad_##NAME(const LiftedMixBlock<float>& b, int64_t a0, int64_t a1) {  \
    LseMixKernel<float, W, LiftedLanes, LiftedCleanLanes>::grad(b, a0, a1);                 \
  }                                                                                         \
  TARGET void circle_clean_fold_##NAME(const CircleMixBlock<float>& b, int64_t a0,          \
                                       int64_t a1) {                                        \
    LseMixKernel<float, W, CircleLanes>::clean_fold(b, a0, a1);                             \
  }                                                                                         \
  TARGET void circle_clean_grad_##NAME(const CircleMixBlock<float>& b, float* s, int64_t i0, \
                                       int64_t i1) {                                        \
    LseMixKernel<float, W, CircleLanes>::clean_sym_grad(b, s, i0, i1);                      \
  }                                                                                         \
  TARGET void lifted_clean_fold_##NAME(const LiftedMixBlock<float>& b, int64_t a0,          \
                                       int64_t a1) {                                        \
    LseMixKernel<float, W, LiftedLanes, LiftedCleanLanes>::clean_fold(b, a0, a1);           \
  }                                                                                         \
  TARGET void lifted_clean_grad_##NAME(const LiftedMixBlock<float>& b, float* s, int64_t i0, \
                                       int64_t i1) {                                        \
    LseMixKernel<float, W, LiftedLanes, LiftedCleanLanes>::clean_sym_grad(b, s, i0, i1);    \
  }                                                                                         \
  const LseMixKernels<float> k_##NAME{&circle_fold_##NAME,       &circle_grad_##NAME,       \
                                      &lifted_fold_##NAME,       &lifted_grad_##NAME,       \
                                      &circle_clean_fold_##NAME, &circle_clean_grad_##NAME, \
                                      &lifted_clean_fold_##NAME, &lifted_clean_grad_##NAME};

#if defined(__x86_64__) && defined(__GNUC__)
MO_LSE_LEVEL(avx512, __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), 16)
MO_LSE_LEVEL(avx2, __attribute__((target("avx2,fma"))), 8)
#endif
MO_LSE_LEVEL(baseline, , 4)
#undef MO_LSE_LEVEL

void circle_fold_f64(const CircleMixBlock<double>& b, int64_t a0, int64_t a1,
                     OnlineLse<double>* pos, OnlineLse<double>* neg) {
  LseMixKernel<double, 1, CircleLanes>::fold(b, a0, a1, pos, neg);
}
void circle_grad_f64(const CircleMixBlock<double>& b, int64_t a0, int64_t a1) {
  LseMixKernel<double, 1, CircleLanes>::grad(b, a0, a1);
}
void lifted_fold_f64(const LiftedMixBlock<double>& b, int64_t a0, int64_t a1,
                     OnlineLse<double>* pos, OnlineLse<double>* neg) {
  LseMixKernel<double, 1, LiftedLanes, LiftedCleanLanes>::fold(b, a0, a1, pos, neg);
}
void lifted_grad_f64(const LiftedMixBlock<double>& b, int64_t a0, int64_t a1) {
  LseMixKernel<double, 1, LiftedLanes, LiftedCleanLanes>::grad(b, a0, a1);
}

void circle_clean_fold_f64(const CircleMixBlock<double>& b, int64_t a0, int64_t a1) {
  LseMixKernel<double, 1, CircleLanes>::clean_fold(b, a0, a1);
}
void circle_clean_grad_f64(const CircleMixBlock<double>& b, double* s, int64_t i0, int64_t i1) {
  LseMixKernel<double, 1, CircleLanes>::clean_sym_grad(b, s, i0, i1);
}
void lifted_clean_fold_f64(const LiftedMixBlock<double>& b, int64_t a0, int64_t a1) {
  LseMixKernel<double, 1, LiftedLanes, LiftedCleanLanes>::clean_fold(b, a0, a1);
}
void lifted_clean_grad_f64(const LiftedMixBlock<double>& b, double* s, int64_t i0, int64_t i1) {
  LseMixKernel<double, 1, LiftedLanes, LiftedCleanLanes>::clean_sym_grad(b, s, i0, i1);
}

}  // namespace

// The level of ms_kernels_f32 (unset or auto: 16 lanes on an AVX-512 CPU). These kernels
// combine no comparison masks (common/fast_exp.h lane_pick), so GCC keeps them vector code
// there. benchmarks/results/cpu_metrix_circle.json (Intel VM, B = 4096, D = 512):
// 0.470 s at 8 lanes, 0.374 s at 16; cpu_metrix_generalized_lifted.json 0.555 → 0.443 s.
const LseMixKernels<float>& lse_mix_kernels_f32() {
  const char* level = ms_kernels_f32().level;  // checks METRIX_OPS_SIMD against this CPU
#if defined(__x86_64__) && defined(__GNUC__)
  if (!std::strcmp(level, "avx512")) return k_avx512;
  if (!std::strcmp(level, "avx2")) return k_avx2;
#endif
  return k_baseline;
}

const LseMixKernels<double>& lse_mix_kernels_f64() {
  static const LseMixKernels<double> k{&circle_fold_f64,       &circle_grad_f64,
                                       &lifted_fold_f64,       &lifted_grad_f64,
                                       &circle_clean_fold_f64, &circle_clean_grad_f64,
                                       &lifted_clean_fold_f64, &lifted_clean_grad_f64};
  return k;
}

}  // namespace metrix_ops
