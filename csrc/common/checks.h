// Argument checks and helpers shared by the CPU and CUDA entry points. Defined once in
// csrc/checks.cpp (compiled by the C++ compiler only): inline definitions here would be
// compiled twice, by g++ and by nvcc's host pass with other flags, and the linker may keep
// either copy — an ODR clash that crashed on torch 2.11 when a check threw.
#pragma once
// ATen/core/Tensor.h, not torch/types.h (all of ATen): every translation unit includes this
// header, and the narrower includes halve the compile time of the CUDA file.
#include <ATen/core/Tensor.h>

namespace metrix_ops {

// The op's contract, checked again in C++ because torch.ops.metrix_ops.* can be called
// without the Python wrapper; every message names the offending argument.
void check_sim_inputs(const at::Tensor& x, const at::Tensor& r, double scale, int64_t chunk);

// The fused pair-loss ops' inputs (unit anchors x and references r, fp32/fp64, int64 labels
// of matching lengths, chunk > 0), all on one device: the CUDA entry points' copy of the
// CPU ops' checks (cpu/op_checks.h), which nvcc must not compile.
void check_pair_op_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                          const at::Tensor& ref_labels, int64_t chunk);

// The listed-pairs similarity ops' inputs (pair_sims_fwd/bwd): x (B, D) and r (M, D) of one
// floating dtype, int64 rows in [0, B) and cols in [0, M) of one length, all on one device.
void check_pair_sims_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& rows,
                            const at::Tensor& cols);

// Examples x against class proxies p (labels in [0, num_classes)), all on one device.
void check_proxy_op_inputs(const at::Tensor& x, const at::Tensor& p, const at::Tensor& labels,
                           int64_t chunk);

// A vector of one value per row (the backward ops' upstream gradients and saved statistics),
// on x's device.
void check_row_vec(const at::Tensor& t, const at::Tensor& x, const char* name);

// The all-triplets ops' inputs (csrc/cpu/triplet_cpu.cpp, triplet_mined_cpu.cpp,
// csrc/cuda/triplet_cuda.cu): unit anchors x against unit references r of one floating
// dtype, int64 labels of matching lengths, all on one device; exclude_diag needs r to
// start with the batch; a finite margin.
void check_triplet_inputs(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                          const at::Tensor& ref_labels, bool exclude_diag, double margin,
                          int64_t chunk);

// The mined-triplet ops' rule: mine_kind 0 (all), 1 (hard), 2 (semihard) or 3 (easy)
// (common/triplet.h's TriMineKind), a finite mine_margin.
void check_mine_rule(int64_t kind, double mine_margin);

// raw_sq reads the squared L2 of raw rows through the cosine keys: it needs cosine=true
void check_raw_sq(bool cosine, bool raw_sq);

// The triplet ops' block of values, rows [start, start + len) of x against r. L2: distances
// exactly as PML's LpDistance computes them, torch.cdist on the unit rows with the
// matmul-or-direct choice cdist makes for the whole B×M call, so that rounding-level ties
// (quantised embeddings, margin 0) fall on the same side of the hinge as in PML. Cosine: S,
// as PML. raw_sq (with cosine): the squared L2 of rows of any norm, read as the similarity
// 1 − d²/2 of that cdist's d, so the cosine keys at half the margin give PML's fl(d)² terms
// (halved), to the rounding of 1 − d²/2 (~ε·|1 − d²/2|: near-ties of the hinge may fall on
// the other side). Any device (ATen's products).
at::Tensor triplet_value_block(const at::Tensor& x, const at::Tensor& r, int64_t start,
                               int64_t len, bool cosine, bool raw_sq = false);

// Adds the gradient of a block of triplet_value_block's values to dx (rows [start,
// start + len)) and dr, from g = ∂L/∂s of the block as the keys' chain makes it (for L2,
// −(∂L/∂d)/d). Cosine: dx += g r, dr += gᵀ x. L2: d = ‖x_i − r_j‖ of the rows as given
// (cdist), whose gradient (x_i − r_j)/d adds a radial part: dx_i −= (Σ_j g_ij) x_i here, and
// dr_j −= (Σ_i g_ij) r_j, whose sums gather in col_sums (M, zeros before the first block)
// for finish_triplet_grad to apply once. Unit rows' callers lose that part in the
// normalisation's backward; the L2 of raw rows (fused/raw_l2.py) needs it, and so does
// raw_sq's 1 − d²/2, whose gradient in x_i is r_j − x_i (g = ∂L/∂s there).
void add_triplet_block_grad(at::Tensor& dx, at::Tensor& dr, at::Tensor& col_sums,
                            const at::Tensor& g, const at::Tensor& x, const at::Tensor& r,
                            int64_t start, int64_t len, bool cosine, bool raw_sq = false);
void finish_triplet_grad(at::Tensor& dr, const at::Tensor& col_sums, const at::Tensor& r,
                         bool cosine, bool raw_sq = false);

// Accumulation type: fp64 for fp64 inputs, fp32 for everything else (fp16/bf16 included).
at::ScalarType acc_type(const at::Tensor& x);

// L2 row normalisation in the accumulation type, eps as torch.nn.functional.normalize.
at::Tensor normalize_rows(const at::Tensor& x);

}  // namespace metrix_ops
