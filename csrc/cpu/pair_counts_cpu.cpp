// Numbers of positive and negative pairs of a call on the CPU, without listing the pairs:
// each label's matches among the sorted reference labels, by binary search, O((B+M) log M).
// One op where the PyTorch form is seven (a sort, two searchsorted, a sum and three
// subtractions), which at small batches cost more than the loss's own arithmetic.
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

namespace metrix_ops {

namespace {

void check_label_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, name,
              " must be a 1-D int64 tensor, got ", t.dim(), "-D ", t.scalar_type());
}

}  // namespace

// (#positive pairs, #negative pairs) as 0-d int64 tensors; same_set: the batch against itself,
// whose B self pairs are not positives
std::tuple<at::Tensor, at::Tensor> pair_counts_cpu(const at::Tensor& labels_,
                                                   const at::Tensor& ref_labels_, bool same_set) {
  check_label_vector(labels_, "labels");
  check_label_vector(ref_labels_, "ref_labels");
  const auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = labels.size(0), M = ref_labels.size(0);
  const int64_t* rp = ref_labels.data_ptr<int64_t>();
  std::vector<int64_t> sorted(rp, rp + M);
  std::sort(sorted.begin(), sorted.end());
  const int64_t* lp = labels.data_ptr<int64_t>();
  int64_t matches = 0;
  for (int64_t i = 0; i < B; ++i) {
    const auto run = std::equal_range(sorted.begin(), sorted.end(), lp[i]);
    matches += run.second - run.first;
  }
  const auto opts = labels.options();
  return {at::scalar_tensor(matches - (same_set ? B : 0), opts),
          at::scalar_tensor(B * M - matches, opts)};
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  m.def("pair_counts(Tensor labels, Tensor ref_labels, bool same_set) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) { m.impl("pair_counts", &pair_counts_cpu); }

}  // namespace metrix_ops
