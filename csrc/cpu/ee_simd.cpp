// The Embedding Expansion closest-pair kernels and the HPHN mining's marks and row maxima
// (ee_closest.h) compiled per x86 level, chosen
// by METRIX_OPS_SIMD when set, else the widest level this CPU has (AVX-512 included; see below).
// Contraction into FMA is off in this file: the reference rounds each product apart, and
// exact ties must fall the same way (ee_closest.h).
#pragma GCC optimize("fp-contract=off")

#include <cstring>

#include "cpu/ee_closest.h"
#include "cpu/ms_kernels.h"

namespace metrix_ops {

namespace {

// The fp32 kernels of one x86 level.
struct EeLevel {
  EeClosestFn<float> closest;
  EeCombineFn<float> combine;
  EeSegMarksFn<float> seg_marks;
  EeRowMaxFn<float> row_max;
  EeArcsFilterFn<float> arcs_filter;
};

#define MO_EE_LEVEL(NAME, TARGET, W)                                                     \
  TARGET void closest_##NAME(const EeSideRows<float>& sd, const float* qn, int64_t nt,   \
                             float* best, float* arg) {                                 \
    EeClosestKernel<float, W>::run(sd, qn, nt, best, arg);                               \
  }                                                                                      \
  TARGET void combine_##NAME(const float* h0, const EeSegBest<float>& sb,                \
                             const float* qn, int64_t nt, float* best, float* arg) {     \
    EeCombineKernel<float, W>::run(h0, sb, qn, nt, best, arg);                           \
  }                                                                                      \
  TARGET int64_t seg_marks_##NAME(const float* a, const float* b, int64_t n,             \
                                  const float* Ui, const float* Uj, const float* km,     \
                                  float fm, int64_t B, int64_t* marked) {                \
    return EeSegMarksKernel<float, W>::run(a, b, n, Ui, Uj, km, fm, B, marked);          \
  }                                                                                      \
  TARGET void row_max_##NAME(const float* u, int64_t count, float* mx, int* nan) {       \
    EeRowMaxKernel<float, W>::run(u, count, mx, nan);                                    \
  }                                                                                      \
  TARGET int64_t arcs_filter_##NAME(const EeArc<float>& e, const EeArc<float>* arc,      \
                                    const float* Ui, const float* Uj, const int64_t* pu, \
                                    const int64_t* pw, float lo, int64_t* cand,          \
                                    int64_t nc) {                                        \
    return EeArcsFilterKernel<float, W>::run(e, arc, Ui, Uj, pu, pw, lo, cand, nc);      \
  }                                                                                      \
  const EeLevel level_##NAME{&closest_##NAME, &combine_##NAME, &seg_marks_##NAME,         \
                            &row_max_##NAME, &arcs_filter_##NAME};

#if defined(__x86_64__) && defined(__GNUC__)
MO_EE_LEVEL(avx512, __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2"))), 16)
MO_EE_LEVEL(avx2, __attribute__((target("avx2"))), 8)
#endif
MO_EE_LEVEL(baseline, , 4)
#undef MO_EE_LEVEL

void closest_f64(const EeSideRows<double>& sd, const double* qn, int64_t nt, double* best,
                 double* arg) {
  EeClosestKernel<double, 1>::run(sd, qn, nt, best, arg);
}

void combine_f64(const double* h0, const EeSegBest<double>& sb, const double* qn, int64_t nt,
                 double* best, double* arg) {
  EeCombineKernel<double, 1>::run(h0, sb, qn, nt, best, arg);
}

int64_t seg_marks_f64(const double* a, const double* b, int64_t n, const double* Ui,
                      const double* Uj, const double* km, double fm, int64_t B,
                      int64_t* marked) {
  return EeSegMarksKernel<double, 1>::run(a, b, n, Ui, Uj, km, fm, B, marked);
}

void row_max_f64(const double* u, int64_t count, double* mx, int* nan) {
  EeRowMaxKernel<double, 1>::run(u, count, mx, nan);
}

int64_t arcs_filter_f64(const EeArc<double>& e, const EeArc<double>* arc, const double* Ui,
                        const double* Uj, const int64_t* pu, const int64_t* pw, double lo,
                        int64_t* cand, int64_t nc) {
  return EeArcsFilterKernel<double, 1>::run(e, arc, Ui, Uj, pu, pw, lo, cand, nc);
}

// The level in use, for all of these kernels (the marks', the maxima's and the pair filter's
// loops also compile to whole vectors).
const EeLevel& ee_level() {
  const char* level = ms_kernels_f32().level;  // validated there
#if defined(__x86_64__) && defined(__GNUC__)
  // The level of ms_kernels_f32, which is AVX-512 under "auto" on a CPU that has it. The
  // closest-pair kernel compiles to whole 512-bit vectors (the pair filter still has ~30
  // lane-wise compares): EE-MS (n = 8, adjacent) at B = 2048, D = 512 takes 0.435 s with
  // it against 0.448 s with AVX2
  // (benchmarks/results/cpu_simd_{auto,avx2}_ee_ms_n8_adjacent.json).
  if (!std::strcmp(level, "avx512")) return level_avx512;
  if (!std::strcmp(level, "avx2")) return level_avx2;
#endif
  (void)level;
  return level_baseline;
}

}  // namespace

EeClosestFn<float> ee_closest_f32() { return ee_level().closest; }
EeClosestFn<double> ee_closest_f64() { return &closest_f64; }
EeCombineFn<float> ee_combine_f32() { return ee_level().combine; }
EeCombineFn<double> ee_combine_f64() { return &combine_f64; }
EeSegMarksFn<float> ee_seg_marks_f32() { return ee_level().seg_marks; }
EeSegMarksFn<double> ee_seg_marks_f64() { return &seg_marks_f64; }
EeRowMaxFn<float> ee_row_max_f32() { return ee_level().row_max; }
EeRowMaxFn<double> ee_row_max_f64() { return &row_max_f64; }
EeArcsFilterFn<float> ee_arcs_filter_f32() { return ee_level().arcs_filter; }
EeArcsFilterFn<double> ee_arcs_filter_f64() { return &arcs_filter_f64; }

}  // namespace metrix_ops
