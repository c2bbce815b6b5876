// The EE layout and argument checks (ee_layout.h), compiled by the C++ compiler only.
#include "cpu/ee_layout.h"

#include <torch/types.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu/op_checks.h"

namespace metrix_ops {

EeLayout make_layout(const at::Tensor& labels, const at::Tensor& seg_i, const at::Tensor& seg_j,
                     int64_t n, int64_t chunk) {
  EeLayout L;
  const int64_t B = L.B = labels.size(0);
  L.n = n;
  const int64_t* lab = labels.data_ptr<int64_t>();
  check_segments(lab, B, seg_i, seg_j);
  L.S = n > 0 ? seg_i.size(0) : 0;
  L.order.resize(B);
  std::iota(L.order.begin(), L.order.end(), 0);
  std::stable_sort(L.order.begin(), L.order.end(),
                   [&](int64_t a, int64_t b) { return lab[a] < lab[b]; });
  L.slot.resize(B);
  L.cls.resize(B);
  L.cstart = {0};
  for (int64_t r = 0; r < B; ++r) {
    if (r > 0 && lab[L.order[r]] != lab[L.order[r - 1]]) L.cstart.push_back(r);
    L.cls[L.order[r]] = int64_t(L.cstart.size()) - 1;
    L.slot[L.order[r]] = r;
  }
  L.cstart.push_back(B);
  L.C = B > 0 ? int64_t(L.cstart.size()) - 1 : 0;
  if (B == 0) L.cstart = {0};
  L.class_segs.resize(L.C);
  L.of_anchor.resize(B);
  if (L.S > 0) {
    const int64_t* pi = seg_i.data_ptr<int64_t>();
    const int64_t* pj = seg_j.data_ptr<int64_t>();
    L.si.assign(pi, pi + L.S);
    L.sj.assign(pj, pj + L.S);
    L.seg_rank.resize(L.S);
    for (int64_t e = 0; e < L.S; ++e) {
      const int64_t i = pi[e];
      L.seg_rank[e] = int64_t(L.class_segs[L.cls[i]].size());
      L.class_segs[L.cls[i]].push_back(e);
      L.of_anchor[i].push_back(e);
    }
    for (int64_t e = 0; e < L.S; ++e) L.of_anchor[pj[e]].push_back(e);
  }
  L.chunk_cls = {0};
  for (int64_t c0 = 0; c0 < L.C;) {  // at least one class, then while the rows fit
    int64_t c1 = c0 + 1;
    while (c1 < L.C && L.cstart[c1 + 1] - L.cstart[c0] <= chunk) ++c1;
    L.chunk_cls.push_back(c1);
    c0 = c1;
  }
  return L;
}

void check_ee_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& seg_i,
                   const at::Tensor& seg_j, const at::Tensor& anchor_mask,
                   const at::Tensor& neg_mask, int64_t n, int64_t chunk) {
  check_ee_rows_segments(x, labels, seg_i, seg_j, n, chunk);
  for (const at::Tensor* m : {&anchor_mask, &neg_mask})
    TORCH_CHECK(m->dim() == 1 && m->size(0) == x.size(0) && m->scalar_type() == at::kBool,
                m == &anchor_mask ? "anchor_mask" : "neg_mask", " must be bool of shape (",
                x.size(0), ",)");
}

std::vector<int64_t> pos_offsets(const EeLayout& L) {
  std::vector<int64_t> off(L.B + 1, 0);
  for (int64_t i = 0; i < L.B; ++i)
    off[i + 1] = off[i] + (L.cstart[L.cls[i] + 1] - L.cstart[L.cls[i]] - 1);
  return off;
}

void check_pos(const EeLayout& L, const at::Tensor& pos, const at::Tensor& x) {
  const int64_t want = pos_offsets(L)[L.B];
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == want && pos.scalar_type() == x.scalar_type(),
              "pos must be of x's dtype and shape (", want, ",): each anchor's clean metric to "
              "its positives");
}

}  // namespace metrix_ops
