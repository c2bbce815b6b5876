#include "cpu/refs_runs.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace metrix_ops {

std::vector<ClassRun> class_runs(const int64_t* y, int64_t B, const int64_t* yr, int64_t M,
                                 const int64_t* own) {
  for (int64_t j = 1; j < M; ++j)
    TORCH_CHECK(yr[j] >= yr[j - 1], "ref_labels must be sorted (non-decreasing): the Metrix "
                "op takes each class's positives as one run");
  std::vector<ClassRun> runs;
  for (int64_t s = 0; s < B;) {
    int64_t e = s + 1;
    while (e < B && y[e] == y[s]) ++e;
    TORCH_CHECK(e == B || y[e] > y[s], "labels must be sorted (non-decreasing): the Metrix "
                "op takes each class's anchors as one run");
    const int64_t plo = std::lower_bound(yr, yr + M, y[s]) - yr;
    const int64_t phi = std::upper_bound(yr, yr + M, y[s]) - yr;
    for (int64_t a = s; a < e; ++a)
      TORCH_CHECK(own[a] == -1 || (own[a] >= plo && own[a] < phi), "self: anchor ", a,
                  "'s own row ", own[a], " must be -1 or a reference of its label");
    runs.push_back({s, e, plo, phi});
    s = e;
  }
  return runs;
}

}  // namespace metrix_ops
