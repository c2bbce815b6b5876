// The class layout of an Embedding Expansion call (host only): label-sorted rows ("slots"),
// classes, segments, each anchor's side segments A_i and chunks of whole classes. Shared by
// the CPU ops (ee_losses_cpu.cpp) and the CUDA ones (cuda/ee_losses_cuda.cu), so that both
// walk A_i in the same order (the reference's ties go to the earliest side point). Defined
// in ee_layout.cpp, compiled by the C++ compiler only (see common/checks.h: no inline host
// code compiled by both g++ and nvcc).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace metrix_ops {

// Classes, segments and chunks of one call (dtype-free).
struct EeLayout {
  int64_t B = 0, n = 0, S = 0, C = 0;
  std::vector<int64_t> order, slot, cls, cstart;  // slot -> row, row -> slot, row -> class
  std::vector<int64_t> si, sj;                    // segment endpoints (rows)
  std::vector<std::vector<int64_t>> class_segs;   // segments of each class, in order
  std::vector<int64_t> seg_rank;                  // a segment's place in its class's list
  std::vector<std::vector<int64_t>> of_anchor;    // A_i's segments: (i, ·) then (·, i)
  std::vector<int64_t> chunk_cls;                 // chunk t: classes [chunk_cls[t], [t + 1])
};

// The layout of CPU int64 labels (B,) and segments (S,) (checked: positive pairs of distinct
// rows), with chunks of whole classes of about `chunk` rows (a larger class is its own chunk).
EeLayout make_layout(const at::Tensor& labels, const at::Tensor& seg_i, const at::Tensor& seg_j,
                     int64_t n, int64_t chunk);

// The arguments of the EE ops, whatever their device (each engine adds its device rule).
void check_ee_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& seg_i,
                   const at::Tensor& seg_j, const at::Tensor& anchor_mask,
                   const at::Tensor& neg_mask, int64_t n, int64_t chunk);

// first CSR entry of each anchor: anchors in index order, |class| − 1 positives each
std::vector<int64_t> pos_offsets(const EeLayout& L);

// ee_triplet's `pos`: x's dtype, one entry per (anchor, positive)
void check_pos(const EeLayout& L, const at::Tensor& pos, const at::Tensor& x);

}  // namespace metrix_ops
