// Denormal results flushed to zero (and denormal inputs read as zero) for the scope of one
// kernel task, the caller's mode restored after. A product whose result is denormal costs a
// microcode assist of ~100+ cycles on x86: the Metrix candidates' terms, e^(logit − max)
// times their weights, land there whenever a logit sits ~87 below its row's max, and at
// B = 4096, D = 128 the two multiplies after Metrix-Circle's exp took ~45 % of its gradient
// kernel (perf annotate). Such terms are below 2^−126 relative to the row's largest one:
// flushing them changes no sum by more than that. No-op off x86.
#pragma once

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <xmmintrin.h>
#define METRIX_OPS_HAS_MXCSR 1
#endif

namespace metrix_ops {

class FlushDenormals {
 public:
#ifdef METRIX_OPS_HAS_MXCSR
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtzDaz = 0x8040;  // MXCSR bits FTZ (15) and DAZ (6)
  unsigned saved_;
#else
  FlushDenormals() {}
#endif
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

}  // namespace metrix_ops
