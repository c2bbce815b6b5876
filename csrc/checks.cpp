#include "common/checks.h"
#include "cpu/op_checks.h"

#include <cmath>

namespace metrix_ops {

void check_sim_inputs(const at::Tensor& x, const at::Tensor& r, double scale, int64_t chunk) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (B, D), got ", x.dim(), "-D");
  TORCH_CHECK(r.dim() == 2, "r must be 2-D (M, D), got ", r.dim(), "-D");
  TORCH_CHECK(x.size(1) == r.size(1), "x and r must have the same D, got ", x.size(1), " and ",
              r.size(1));
  TORCH_CHECK(x.device() == r.device(), "x and r must be on the same device");
  TORCH_CHECK(x.scalar_type() == r.scalar_type(), "x and r must have the same dtype");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(chunk > 0, "chunk must be > 0, got ", chunk);
}

void check_pair_op_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                          const at::Tensor& ref_labels, int64_t chunk) {
  check_pair_inputs(x, r, labels, ref_labels, chunk);
  TORCH_CHECK(r.device() == x.device() && labels.device() == x.device() &&
                  ref_labels.device() == x.device(),
              "x, r, labels and ref_labels must be on one device, got ", x.device(), ", ",
              r.device(), ", ", labels.device(), ", ", ref_labels.device());
}

void check_proxy_op_inputs(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                           int64_t chunk) {
  check_proxy_inputs(x, p, labels, chunk);
  TORCH_CHECK(p.device() == x.device() && labels.device() == x.device(),
              "x, proxies and labels must be on one device, got ", x.device(), ", ", p.device(),
              ", ", labels.device());
}

void check_row_vec(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_vec(t, x.size(0), name);
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
}

void check_triplet_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                          const at::Tensor& ref_labels, bool exclude_diag, double margin,
                          int64_t chunk) {
  check_sim_inputs(x, r, 1.0, chunk);
  check_labels_of(labels, x.size(0), "labels");
  check_labels_of(ref_labels, r.size(0), "ref_labels");
  TORCH_CHECK(labels.device() == x.device() && ref_labels.device() == x.device(),
              "x, r, labels and ref_labels must be on one device, got ", x.device(), ", ",
              r.device(), ", ", labels.device(), ", ", ref_labels.device());
  // exclude_diag: row i skips column i, so r holds the batch first (the batch itself, or a
  // CrossBatchMemory bank rolled to start at the batch's slots)
  TORCH_CHECK(!exclude_diag || x.size(0) <= r.size(0),
              "exclude_diag needs r to start with the batch (at least as many rows as x)");
  TORCH_CHECK(std::isfinite(margin), "margin must be finite, got ", margin);
}

void check_mine_rule(int64_t kind, double mine_margin) {
  TORCH_CHECK(kind >= 0 && kind <= 3,
              "mine_kind must be 0 (all), 1 (hard), 2 (semihard) or 3 (easy), got ", kind);
  TORCH_CHECK(std::isfinite(mine_margin), "mine_margin must be finite, got ", mine_margin);
}

void check_raw_sq(bool cosine, bool raw_sq) {
  TORCH_CHECK(!raw_sq || cosine,
              "raw_sq=True (the squared L2 of raw rows, read through the cosine keys) needs "
              "cosine=True");
}

at::Tensor triplet_value_block(const at::Tensor& x, const at::Tensor& r, int64_t start,
                               int64_t len, bool cosine, bool raw_sq) {
  const at::Tensor xc = x.narrow(0, start, len);
  if (cosine && !raw_sq) return at::mm(xc, r.t()).contiguous();
  const int64_t mode = (x.size(0) > 25 || r.size(0) > 25) ? 1 : 2;  // use / do not use mm
  at::Tensor d = at::cdist(xc, r, 2.0, mode);
  if (raw_sq) return d.square_().mul_(-0.5).add_(1.0).contiguous();  // 1 − d²/2
  return d.contiguous();
}

void add_triplet_block_grad(at::Tensor& dx, at::Tensor& dr, at::Tensor& col_sums,
                            const at::Tensor& g, const at::Tensor& x, const at::Tensor& r,
                            int64_t start, int64_t len, bool cosine, bool raw_sq) {
  const at::Tensor xc = x.narrow(0, start, len);
  at::Tensor dxc = dx.narrow(0, start, len);
  dxc.addmm_(g, r);
  dr.addmm_(g.t(), xc);
  if (cosine && !raw_sq) return;
  dxc.addcmul_(g.sum(1, true), xc, -1);
  col_sums.add_(g.sum(0));  // (one pass over dr at the end, not one per block)
}

void finish_triplet_grad(at::Tensor& dr, const at::Tensor& col_sums, const at::Tensor& r,
                         bool cosine, bool raw_sq) {
  if (!cosine || raw_sq) dr.addcmul_(col_sums.unsqueeze(1), r, -1);
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor normalize_rows(const at::Tensor& x) {
  auto xa = x.to(acc_type(x));
  return xa.div(xa.norm(2, {1}, true).clamp_min(1e-12));
}

void check_pair_sims_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& rows,
                            const at::Tensor& cols) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (B, D), got ", x.dim(), "-D");
  TORCH_CHECK(r.dim() == 2, "r must be 2-D (M, D), got ", r.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64 (half inputs are upcast before the op), got ",
              x.scalar_type());
  TORCH_CHECK(x.scalar_type() == r.scalar_type(), "x and r must have the same dtype, got ",
              x.scalar_type(), " and ", r.scalar_type());
  TORCH_CHECK(x.size(1) == r.size(1), "x and r must have the same D, got ", x.size(1), " and ",
              r.size(1));
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be 1-D int64");
  TORCH_CHECK(cols.dim() == 1 && cols.scalar_type() == at::kLong, "cols must be 1-D int64");
  TORCH_CHECK(rows.size(0) == cols.size(0), "rows and cols must have the same length, got ",
              rows.size(0), " and ", cols.size(0));
  TORCH_CHECK(r.device() == x.device() && rows.device() == x.device() &&
                  cols.device() == x.device(),
              "x, r, rows and cols must be on one device, got ", x.device(), ", ", r.device(),
              ", ", rows.device(), ", ", cols.device());
  if (rows.numel()) {
    const int64_t lo = rows.min().item<int64_t>(), hi = rows.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < x.size(0), "rows must be in [0, ", x.size(0), "), got values in [",
                lo, ", ", hi, "]");
    const int64_t clo = cols.min().item<int64_t>(), chi = cols.max().item<int64_t>();
    TORCH_CHECK(clo >= 0 && chi < r.size(0), "cols must be in [0, ", r.size(0),
                "), got values in [", clo, ", ", chi, "]");
  }
}

}  // namespace metrix_ops
