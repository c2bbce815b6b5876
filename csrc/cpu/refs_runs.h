// The class runs of label-sorted anchors against label-sorted references (host only), shared
// by the CPU Metrix walk against references (metrix_refs_walk.h) and the CUDA plan
// (cuda/metrix_rows.cuh), so that both check the same contract. Defined in refs_runs.cpp,
// compiled by the C++ compiler only (see common/checks.h: no inline host code compiled by
// both g++ and nvcc).
#pragma once

#include <cstdint>
#include <vector>

namespace metrix_ops {

// One label's anchors [lo, hi) and its references [plo, phi) (its positives; empty when the
// references lack the label)
struct ClassRun {
  int64_t lo, hi, plo, phi;
};

// The runs of anchor labels y (B) against reference labels yr (M), both checked sorted
// (non-decreasing), and each anchor's own reference own[a] checked to be −1 or a reference
// of its label.
std::vector<ClassRun> class_runs(const int64_t* y, int64_t B, const int64_t* yr, int64_t M,
                                 const int64_t* own);

}  // namespace metrix_ops
