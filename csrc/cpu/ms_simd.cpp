// The fp32 multi-similarity kernels of ms_kernels.h (and the Metrix kernels of MS and
// contrastive, ms_metrix_kernels.h and contrastive_metrix_kernels.h) compiled for three x86 levels in this
// one file (setup.py builds every csrc/cpu file with the same flags, so the wider ones get
// GCC target attributes), and the run-time choice among them. Also two small ops for the
// tests: the level in use, and the fast exp itself.
#include <cstdlib>
#include <cstring>

#include <torch/library.h>
#include <torch/types.h>

#include "cpu/contrastive_metrix_kernels.h"
#include "cpu/ms_metrix_kernels.h"

namespace metrix_ops {

namespace {

// Entry points of one level: thin wrappers whose target attribute is what the (forced
// inline) kernel bodies get compiled for.
#define MO_MS_LEVEL(NAME, TARGET, W)                                                        \
  TARGET void fold_##NAME(const float* s, int64_t i0, int64_t i1, const MsBlock<float>& b, \
                          OnlineLse<float>* pos, OnlineLse<float>* neg) {                  \
    MsRowKernel<float, W>::fold(s, i0, i1, b, pos, neg);                                   \
  }                                                                                        \
  TARGET void grad_##NAME(float* s, int64_t i0, int64_t i1, const MsBlock<float>& b) {     \
    MsRowKernel<float, W>::grad<false>(s, i0, i1, b);                                      \
  }                                                                                        \
  TARGET void fold_cols_##NAME(const float* s, int64_t nr, int64_t j0, int64_t j1,         \
                               const MsBlock<float>& b, OnlineLse<float>* pos,             \
                               OnlineLse<float>* neg) {                                    \
    MsRowKernel<float, W>::fold_cols(s, nr, j0, j1, b, pos, neg);                          \
  }                                                                                        \
  TARGET void grad_sym_##NAME(float* s, int64_t i0, int64_t i1, const MsBlock<float>& b) { \
    MsRowKernel<float, W>::grad<true>(s, i0, i1, b);                                       \
  }                                                                                        \
  TARGET void exp_##NAME(const float* x, float* y, int64_t n) {                            \
    MsRowKernel<float, W>::exp_array(x, y, n);                                             \
  }                                                                                        \
  TARGET void mix_fold_##NAME(const MixBlock<float>& b, int64_t a0, int64_t a1,            \
                              OnlineLse<float>* pos, OnlineLse<float>* neg) {              \
    MixRowKernel<float, W>::fold(b, a0, a1, pos, neg);                                     \
  }                                                                                        \
  TARGET void mix_grad_##NAME(const MixBlock<float>& b, int64_t a0, int64_t a1) {          \
    MixRowKernel<float, W>::grad(b, a0, a1);                                               \
  }                                                                                        \
  TARGET void mix_exp2_##NAME(const float* x, float* y, int64_t n) {                       \
    MixRowKernel<float, W>::exp2_array(x, y, n);                                           \
  }                                                                                        \
  TARGET void con_mix_fold_##NAME(const ConMixBlock<float>& b, int64_t a0, int64_t a1,     \
                                  ConAcc* acc) {                                           \
    ConMixRowKernel<float, W>::fold(b, a0, a1, acc);                                       \
  }                                                                                        \
  TARGET void con_mix_grad_##NAME(const ConMixBlock<float>& b, int64_t a0, int64_t a1) {   \
    ConMixRowKernel<float, W>::grad(b, a0, a1);                                            \
  }                                                                                        \
  const MsKernels<float> k_##NAME{&fold_##NAME,     &grad_##NAME,     &fold_cols_##NAME,   \
                                  &grad_sym_##NAME, &exp_##NAME,      &mix_fold_##NAME,    \
                                  &mix_grad_##NAME, &mix_exp2_##NAME, #NAME};              \
  const ConMixKernels<float> c_##NAME{&con_mix_fold_##NAME, &con_mix_grad_##NAME};

#if defined(__x86_64__) && defined(__GNUC__)
MO_MS_LEVEL(avx512, __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))), 16)
MO_MS_LEVEL(avx2, __attribute__((target("avx2,fma"))), 8)
#endif
MO_MS_LEVEL(baseline, , 4)  // SSE2 on x86-64, NEON on aarch64: both have 4-float vectors
#undef MO_MS_LEVEL

#if defined(__x86_64__) && defined(__GNUC__)
// The default on an AVX-512 CPU: every kernel at 16 lanes except the elementwise exp, which
// stays at 8. The row kernels combine no comparison masks at 16 lanes (ms_kernels.h
// for_lanes), so GCC keeps them whole-register code, and they are faster there: MS fwd+bwd
// at B = 4096, D = 128, interleaved, 63-72 ms at 8 lanes against 53-65 ms at 16. The exp
// alone is faster at 16 lanes too (0.34 against 0.61 ns per element), but the losses that
// call it between rows of 128-bit code (Circle, SupCon, NTXent through row_tiles.h exp_row)
// were 2-7 % slower with it: Circle at D = 512, 180 against 194 ms.
const MsKernels<float> k_avx512_exp8{&fold_avx512,     &grad_avx512,     &fold_cols_avx512,
                                     &grad_sym_avx512, &exp_avx2,        &mix_fold_avx512,
                                     &mix_grad_avx512, &mix_exp2_avx512, "avx512"};
#endif

// fp64 stays scalar with std::exp: its contract is 1e-6 against the reference.
using K64 = MsRowKernel<double, 1>;
void fold_f64(const double* s, int64_t i0, int64_t i1, const MsBlock<double>& b,
              OnlineLse<double>* pos, OnlineLse<double>* neg) {
  K64::fold(s, i0, i1, b, pos, neg);
}
void grad_f64(double* s, int64_t i0, int64_t i1, const MsBlock<double>& b) {
  K64::grad<false>(s, i0, i1, b);
}
void fold_cols_f64(const double* s, int64_t nr, int64_t j0, int64_t j1,
                   const MsBlock<double>& b, OnlineLse<double>* pos, OnlineLse<double>* neg) {
  K64::fold_cols(s, nr, j0, j1, b, pos, neg);
}
void grad_sym_f64(double* s, int64_t i0, int64_t i1, const MsBlock<double>& b) {
  K64::grad<true>(s, i0, i1, b);
}
void exp_f64(const double* x, double* y, int64_t n) { K64::exp_array(x, y, n); }
void mix_fold_f64(const MixBlock<double>& b, int64_t a0, int64_t a1, OnlineLse<double>* pos,
                  OnlineLse<double>* neg) {
  MixRowKernel<double, 1>::fold(b, a0, a1, pos, neg);
}
void mix_grad_f64(const MixBlock<double>& b, int64_t a0, int64_t a1) {
  MixRowKernel<double, 1>::grad(b, a0, a1);
}
void mix_exp2_f64(const double* x, double* y, int64_t n) {
  MixRowKernel<double, 1>::exp2_array(x, y, n);
}
void con_mix_fold_f64(const ConMixBlock<double>& b, int64_t a0, int64_t a1, ConAcc* acc) {
  ConMixRowKernel<double, 1>::fold(b, a0, a1, acc);
}
void con_mix_grad_f64(const ConMixBlock<double>& b, int64_t a0, int64_t a1) {
  ConMixRowKernel<double, 1>::grad(b, a0, a1);
}

const MsKernels<float>* by_name(const char* level) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (!std::strcmp(level, "avx512")) return &k_avx512;
  if (!std::strcmp(level, "avx2")) return &k_avx2;
#endif
  if (!std::strcmp(level, "baseline")) return &k_baseline;
  return nullptr;
}

// the contrastive Metrix kernels of the same level as an MS table
const ConMixKernels<float>& con_of(const MsKernels<float>& k) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (&k == &k_avx512) return c_avx512;
  if (&k == &k_avx512_exp8) return c_avx512;
  if (&k == &k_avx2) return c_avx2;
#endif
  return c_baseline;
}

// The default level: the 16-lane kernels (but the 8-lane exp, above) on an AVX-512 CPU,
// else AVX2 where the CPU has it. Until the row kernels masked one comparison at a time,
// GCC (12) lowered their combined masks a lane at a time under AVX-512 (~500 scalar
// vcomiss/seta in the fold kernel, against 20 now) and AVX2 was the faster level.
// METRIX_OPS_SIMD=avx512|avx2|baseline forces one level for every kernel (the tests compare
// them all).
const MsKernels<float>& default_level() {
  static const MsKernels<float>* best = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has("avx512")) return &k_avx512_exp8;
#endif
    return cpu_has("avx2") ? by_name("avx2") : &k_baseline;
  }();
  return *best;
}

}  // namespace

bool cpu_has(const char* level) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (!std::strcmp(level, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (!std::strcmp(level, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return !std::strcmp(level, "baseline");
}

namespace {

// whether METRIX_OPS_SIMD is unset or "auto"
bool simd_auto() {
  const char* want = std::getenv("METRIX_OPS_SIMD");
  return !want || !*want || !std::strcmp(want, "auto");
}

}  // namespace

// Read on every call (a getenv per op is nothing next to a block of S), so that tests can
// switch levels within one process.
const MsKernels<float>& ms_kernels_f32() {
  if (simd_auto()) return default_level();
  const char* want = std::getenv("METRIX_OPS_SIMD");
  const MsKernels<float>* k = by_name(want);
  TORCH_CHECK(k, "METRIX_OPS_SIMD=", want, ": expected avx512, avx2, baseline or auto");
  TORCH_CHECK(cpu_has(want), "METRIX_OPS_SIMD=", want, ": this CPU does not support it");
  return *k;
}

const MsKernels<double>& ms_kernels_f64() {
  static const MsKernels<double> k{&fold_f64, &grad_f64,     &fold_cols_f64,
                                   &grad_sym_f64, &exp_f64, &mix_fold_f64,
                                   &mix_grad_f64, &mix_exp2_f64, "scalar"};
  return k;
}

const ConMixKernels<float>& con_mix_kernels_f32() { return con_of(ms_kernels_f32()); }

const ConMixKernels<double>& con_mix_kernels_f64() {
  static const ConMixKernels<double> k{&con_mix_fold_f64, &con_mix_grad_f64};
  return k;
}

namespace {

std::string simd_level() { return ms_kernels_f32().level; }

at::Tensor exp_f32(const at::Tensor& x_) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == at::kFloat,
              "_exp_f32 takes a float32 CPU tensor");
  at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  ms_kernels_f32().exp(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  return y;
}

at::Tensor exp2_mix_f32(const at::Tensor& x_) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == at::kFloat,
              "_exp2_mix_f32 takes a float32 CPU tensor");
  at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  ms_kernels_f32().mix_exp2(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // The SIMD level of the fp32 CPU kernels (METRIX_OPS_SIMD, else the widest this CPU has).
  m.def("_simd_level() -> str", &simd_level);
  // The fp32 exp of those kernels, elementwise (for tests against torch.exp).
  m.def("_exp_f32(Tensor x) -> Tensor", &exp_f32);
  // The clamped 2^x of the Metrix kernels (metrix_mix_kernels.h: exp2_mix), elementwise.
  m.def("_exp2_mix_f32(Tensor x) -> Tensor", &exp2_mix_f32);
}

}  // namespace metrix_ops
