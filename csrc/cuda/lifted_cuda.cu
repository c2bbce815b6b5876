// CUDA implementations of the fused lifted-structure ops (the schemas of
// csrc/cpu/lifted_cpu.cpp's gen_lifted_fwd/bwd and lifted_fwd/bwd, so one Python glue serves
// both devices), on the row-chunk engine of cuda/pair_rows.cuh. Per-pair math:
// common/lifted.h, the header the CPU ops use.
//
// GeneralizedLifted: per row the log-sum-exps of PML's margin exponents on each side, loss
// [lse⁺ + lse⁻]₊ with an empty side adding 0.
// Lifted: every row's negative log-sum-exp from the same fold; then the positive pairs, which
// for a batch and references both sorted by label are the diagonal blocks of S: per chunk of
// rows, the contiguous range of references holding their positives, one product, a warp per
// row over its positives (the term of each pair from the two rows' negative log-sum-exps).
// Backward: the same blocks give the positive pairs' G, each row's own weight on its
// negative log-sum-exp, and its partners' shares (stored per entry, summed per column: a
// column's partner row is unique, so no atomics and the sums do not depend on scheduling);
// then one streaming pass spreads the weights over the negatives (grad_all).
#include <torch/library.h>

#include "common/contrastive.h"  // in_window
#include "common/lifted.h"
#include "cuda/pair_rows.cuh"

namespace metrix_ops {

namespace {

template <typename T>
struct GenLiftedRowLoss {
  using State = cuda_pairs::TwoSideLse<T>;
  bool cosine;
  T pos_margin, neg_margin;
  const T* g_rows = nullptr;  // backward: ∂L/∂row and the rows' side log-sum-exps
  const T* lse_pos = nullptr;
  const T* lse_neg = nullptr;

  __device__ void fold(State& st, T s, bool pos, int64_t) const {
    const T t = lifted_dist(s, cosine);
    if (pos) st.pos.push(lifted_pos_arg(t, cosine, pos_margin));
    else st.neg.push(lifted_neg_arg(t, cosine, neg_margin));
  }
  // the row's loss from its finished log-sum-exps: [lse⁺ + lse⁻]₊, an empty side adding 0
  __device__ T finish(T lp, T ln) const {
    const T pre = gen_lifted_pre(lp, ln);
    return pre > T(0) ? pre : T(0);
  }
  __device__ T grad(T s, bool pos, int64_t i) const {
    return gen_lifted_grad(s, pos, cosine, pos_margin, neg_margin, g_rows[i], lse_pos[i],
                           lse_neg[i]);
  }
};

// the loss for one dtype from the backward's per-row pointers (all null for the forward)
auto gen_lifted_loss_of(bool cosine, double pos_margin, double neg_margin) {
  return [=](auto g, auto lp, auto ln) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
    return GenLiftedRowLoss<T>{cosine, T(pos_margin), T(neg_margin), g, lp, ln};
  };
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_lifted_fwd_cuda(
    const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk, bool raw) {
  // (rows of any norm are the CPU op's form: the CUDA glue keeps raw L2 off this op)
  TORCH_CHECK(!raw, "gen_lifted_fwd: raw=True (rows of any norm) is CPU-only");
  return cuda_pairs::two_side_fwd(x, r, labels, ref_labels, exclude_diag, chunk,
                                  gen_lifted_loss_of(cosine, pos_margin, neg_margin));
}

std::tuple<at::Tensor, at::Tensor> gen_lifted_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& r,
    const at::Tensor& labels, const at::Tensor& ref_labels, const at::Tensor& lse_pos,
    const at::Tensor& lse_neg, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk, bool raw) {
  TORCH_CHECK(!raw, "gen_lifted_bwd: raw=True (rows of any norm) is CPU-only");
  return cuda_pairs::two_side_bwd(grad_rows, x, r, labels, ref_labels, lse_pos, lse_neg,
                                  exclude_diag, chunk, true,
                                  gen_lifted_loss_of(cosine, pos_margin, neg_margin));
}

// The batch against itself (gen_lifted_self_fwd/bwd's schemas, csrc/cpu/lifted_cpu.cpp): S's
// symmetric blocks (cuda_pairs::fold_self, grad_self).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_lifted_self_fwd_cuda(
    const at::Tensor& x, const at::Tensor& labels, bool cosine, double pos_margin,
    double neg_margin, int64_t block, bool raw) {
  TORCH_CHECK(!raw, "gen_lifted_self_fwd: raw=True (rows of any norm) is CPU-only");
  return cuda_pairs::two_side_self_fwd(x, labels, block,
                                       gen_lifted_loss_of(cosine, pos_margin, neg_margin));
}

at::Tensor gen_lifted_self_bwd_cuda(const at::Tensor& grad_rows, const at::Tensor& x,
                                    const at::Tensor& labels, const at::Tensor& lse_pos,
                                    const at::Tensor& lse_neg, bool cosine, double pos_margin,
                                    double neg_margin, int64_t block, bool raw) {
  TORCH_CHECK(!raw, "gen_lifted_self_bwd: raw=True (rows of any norm) is CPU-only");
  return cuda_pairs::two_side_self_bwd(grad_rows, x, labels, lse_pos, lse_neg, block,
                                       gen_lifted_loss_of(cosine, pos_margin, neg_margin));
}

// ---- LiftedStructureLoss

constexpr int kWarps = cuda_pairs::kThreads / 32;  // rows (a warp each) per block

unsigned row_blocks(int64_t n) { return (unsigned)((n + kWarps - 1) / kWarps); }

void check_sorted(const at::Tensor& t, const char* name) {
  if (t.numel() > 1)
    TORCH_CHECK((t.narrow(0, 1, t.numel() - 1) >= t.narrow(0, 0, t.numel() - 1)).all().item<bool>(),
                name, " must be sorted (non-decreasing): the lifted op finds positive pairs "
                "as the diagonal blocks of a label-sorted S");
}

void check_lifted_call(const at::Tensor& x, const at::Tensor& r, const at::Tensor& labels,
                       const at::Tensor& ref_labels, const at::Tensor& partner, int64_t chunk) {
  cuda_pairs::check_cuda_pair_call(x, r, labels, ref_labels, chunk);
  TORCH_CHECK(partner.scalar_type() == at::kLong, "partner must be int64");
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == r.size(0), "partner must be of shape (",
              r.size(0), ",)");
  TORCH_CHECK(partner.device() == x.device(), "partner must be on ", x.device(), ", got ",
              partner.device());
  if (partner.numel()) {
    const int64_t lo = partner.min().item<int64_t>(), hi = partner.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < x.size(0), "partner must be in [-1, ", x.size(0),
                ") (a row of x, or -1 for none), got values in [", lo, ", ", hi, "]");
  }
  check_sorted(labels, "labels");
  check_sorted(ref_labels, "ref_labels");
}

// Anchor i's positives are the references [lo[i], hi[i]) (both label vectors sorted), on the
// device and on the host (the row chunks' column ranges).
struct PosRanges {
  at::Tensor lo, hi, lo_h, hi_h;
};

PosRanges pos_ranges(const at::Tensor& labels, const at::Tensor& ref_labels) {
  PosRanges p;
  p.lo = at::searchsorted(ref_labels, labels, /*out_int32=*/false, /*right=*/false);
  p.hi = at::searchsorted(ref_labels, labels, /*out_int32=*/false, /*right=*/true);
  p.lo_h = p.lo.cpu();
  p.hi_h = p.hi.cpu();
  return p;
}

// fn(s, start, len, c0, width) for each chunk of rows holding a positive pair: s is their
// block against the references [c0, c0 + width) that hold all their positives (contiguous,
// the callee may overwrite it)
template <class F>
void for_pos_blocks(const at::Tensor& x, const at::Tensor& r, const PosRanges& p, int64_t chunk,
                    F&& fn) {
  const int64_t B = x.size(0);
  const int64_t *lo = p.lo_h.data_ptr<int64_t>(), *hi = p.hi_h.data_ptr<int64_t>();
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t len = std::min(chunk, B - start);
    const int64_t c0 = lo[start], c1 = hi[start + len - 1];
    if (c1 <= c0) continue;  // no row of the chunk has a positive reference
    at::Tensor s = at::mm(x.narrow(0, start, len), r.narrow(0, c0, c1 - c0).t()).contiguous();
    fn(s, start, len, c0, c1 - c0);
  }
}

// The lifted pair (row gi, reference gj) from the rows' negative log-sum-exps ln
template <typename T>
__device__ __forceinline__ LiftedPair<T> pair_at(T s, int64_t gi, int64_t gj,
                                                 const int64_t* __restrict__ partner,
                                                 const T* __restrict__ ln, bool cosine,
                                                 T pos_margin) {
  const int64_t q = partner[gj];
  const T lse_p = (q >= 0 && q != gi) ? ln[q] : -std::numeric_limits<T>::infinity();
  return lifted_pair(s, ln[gi], lse_p, cosine, pos_margin);
}

template <typename T>
__global__ void lifted_pos_fwd_kernel(const T* __restrict__ s, int64_t len, int64_t width,
                                      int64_t start, int64_t c0, const int64_t* __restrict__ lo,
                                      const int64_t* __restrict__ hi,
                                      const int64_t* __restrict__ partner,
                                      const T* __restrict__ ln, bool exclude_diag, bool cosine,
                                      T pos_margin, T low, T high, double* __restrict__ sums,
                                      int64_t* __restrict__ counts) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= len) return;  // the whole warp: i is the warp's
  const int64_t gi = start + i;
  double sum = 0;
  long long cnt = 0;
  for (int64_t gj = lo[gi] + lane; gj < hi[gi]; gj += 32) {
    if (exclude_diag && gj == gi) continue;
    const T v = pair_at(s[i * width + gj - c0], gi, gj, partner, ln, cosine, pos_margin).value;
    if (!in_window(v, low, high)) continue;
    sum += double(v);
    ++cnt;
  }
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, off);
    cnt += __shfl_xor_sync(0xffffffffu, cnt, off);
  }
  if (lane == 0) sums[gi] = sum, counts[gi] = cnt;
}

// The positive block in place: G of the positive pairs (0 elsewhere), w[gi] += the row's own
// weight on its negative log-sum-exp, wp the partners' shares per entry.
template <typename T>
__global__ void lifted_pos_bwd_kernel(T* __restrict__ s, T* __restrict__ wp, int64_t len,
                                      int64_t width, int64_t start, int64_t c0,
                                      const int64_t* __restrict__ lo,
                                      const int64_t* __restrict__ hi,
                                      const int64_t* __restrict__ partner,
                                      const T* __restrict__ ln, const T* __restrict__ g,
                                      bool exclude_diag, bool cosine, T pos_margin, T low,
                                      T high, T* __restrict__ w) {
  const int64_t i = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= len) return;
  const int64_t gi = start + i, j0 = lo[gi], j1 = hi[gi];
  T own = T(0);
  T* row = s + i * width;
  for (int64_t j = lane; j < width; j += 32) {
    const int64_t gj = c0 + j;
    T gij = T(0);
    if (gj >= j0 && gj < j1 && !(exclude_diag && gj == gi)) {
      const LiftedPair<T> q = pair_at(row[j], gi, gj, partner, ln, cosine, pos_margin);
      if (in_window(q.value, low, high)) {
        const T gh = g[gi] * lifted_dh(q);
        own += gh * q.w_a;
        wp[i * width + j] = gh * q.w_p;
        gij = -gh * q.k;  // ∂(pos exponent)/∂s = −k
      }
    }
    row[j] = gij;
  }
  for (int off = 16; off > 0; off >>= 1) own += __shfl_xor_sync(0xffffffffu, own, off);
  if (lane == 0) w[gi] += own;
}

// Column j's partner row gets the block's shares of column j (partners are distinct per
// column: one writer per row)
template <typename T>
__global__ void partner_shares_kernel(const T* __restrict__ wp, int64_t len, int64_t width,
                                      int64_t c0, const int64_t* __restrict__ partner,
                                      T* __restrict__ w) {
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= width) return;
  const int64_t q = partner[c0 + j];
  if (q < 0) return;
  T acc = T(0);
  for (int64_t i = 0; i < len; ++i) acc += wp[i * width + j];  // coalesced across threads
  w[q] += acc;
}

// The negatives' G: ∂lse⁻_i/∂s_in = e^{neg exponent − lse⁻_i}·k, times row i's weight
template <typename T>
struct LiftedNegGrad {
  bool cosine;
  T neg_margin;
  const T* w;
  const T* ln;
  __device__ T grad(T s, bool pos, int64_t i) const {
    const T wi = w[i];
    if (pos || wi == T(0)) return T(0);  // positives: not negatives
    const T t = lifted_dist(s, cosine);
    return wi * lifted_slope(t, cosine) * std::exp(lifted_neg_arg(t, cosine, neg_margin) - ln[i]);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lifted_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, const at::Tensor& partner_, bool exclude_diag, bool cosine,
    double pos_margin, double neg_margin, double low, double high, int64_t chunk, bool raw) {
  TORCH_CHECK(!raw, "lifted_fwd: raw=True (rows of any norm) is CPU-only");
  check_lifted_call(x_, r_, labels_, ref_labels_, partner_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous(), partner = partner_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  // every row's negative log-sum-exp: GeneralizedLifted's fold (its positive side unused)
  const at::Tensor ln = std::get<2>(gen_lifted_fwd_cuda(x, r, labels, ref_labels, exclude_diag,
                                                        cosine, pos_margin, neg_margin, chunk,
                                                        false));
  at::Tensor sums = at::zeros({B}, x.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({B}, labels.options());
  if (B == 0) return {sums.to(x.scalar_type()), counts, ln};
  const PosRanges p = pos_ranges(labels, ref_labels);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lifted_fwd_cuda", [&] {
    using T = scalar_t;
    for_pos_blocks(x, r, p, chunk, [&](at::Tensor& s, int64_t start, int64_t len, int64_t c0,
                                       int64_t width) {
      lifted_pos_fwd_kernel<T><<<row_blocks(len), cuda_pairs::kThreads, 0, stream>>>(
          s.data_ptr<T>(), len, width, start, c0, p.lo.data_ptr<int64_t>(),
          p.hi.data_ptr<int64_t>(), partner.data_ptr<int64_t>(), ln.data_ptr<T>(), exclude_diag,
          cosine, T(pos_margin), T(low), T(high), sums.data_ptr<double>(),
          counts.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {sums.to(x.scalar_type()), counts, ln};
}

std::tuple<at::Tensor, at::Tensor> lifted_bwd_cuda(
    const at::Tensor& grad_sums, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& partner_,
    const at::Tensor& lse_neg, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, double low, double high, int64_t chunk, bool raw) {
  TORCH_CHECK(!raw, "lifted_bwd: raw=True (rows of any norm) is CPU-only");
  check_lifted_call(x_, r_, labels_, ref_labels_, partner_, chunk);
  check_row_vec(grad_sums, x_, "grad_sums");
  check_row_vec(lse_neg, x_, "lse_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous(), partner = partner_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_sums.to(x.scalar_type()).contiguous();
  auto ln = lse_neg.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0);
  at::Tensor dx = at::zeros_like(x), dr = at::zeros_like(r);
  if (B == 0) return {dx, dr};
  const PosRanges p = pos_ranges(labels, ref_labels);
  at::Tensor w = at::zeros({B}, x.options());  // each row's weight on its negative lse
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lifted_bwd_cuda", [&] {
    using T = scalar_t;
    for_pos_blocks(x, r, p, chunk, [&](at::Tensor& s, int64_t start, int64_t len, int64_t c0,
                                       int64_t width) {
      at::Tensor wp = at::zeros_like(s);
      lifted_pos_bwd_kernel<T><<<row_blocks(len), cuda_pairs::kThreads, 0, stream>>>(
          s.data_ptr<T>(), wp.data_ptr<T>(), len, width, start, c0, p.lo.data_ptr<int64_t>(),
          p.hi.data_ptr<int64_t>(), partner.data_ptr<int64_t>(), ln.data_ptr<T>(),
          g.data_ptr<T>(), exclude_diag, cosine, T(pos_margin), T(low), T(high),
          w.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      partner_shares_kernel<T><<<(unsigned)((width + cuda_pairs::kThreads - 1) /
                                            cuda_pairs::kThreads),
                                 cuda_pairs::kThreads, 0, stream>>>(
          wp.data_ptr<T>(), len, width, c0, partner.data_ptr<int64_t>(), w.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dx.narrow(0, start, len).addmm_(s, r.narrow(0, c0, width));
      dr.narrow(0, c0, width).addmm_(s.t(), x.narrow(0, start, len));
    });
    const LiftedNegGrad<T> loss{cosine, T(neg_margin), w.data_ptr<T>(), ln.data_ptr<T>()};
    auto neg = cuda_pairs::grad_all<LiftedNegGrad<T>, T>(x, r, labels, ref_labels, exclude_diag,
                                                          chunk, loss);
    dx.add_(std::get<0>(neg));
    dr.add_(std::get<1>(neg));
  });
  return {dx, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("gen_lifted_fwd", &gen_lifted_fwd_cuda);
  m.impl("gen_lifted_bwd", &gen_lifted_bwd_cuda);
  m.impl("gen_lifted_self_fwd", &gen_lifted_self_fwd_cuda);
  m.impl("gen_lifted_self_bwd", &gen_lifted_self_bwd_cuda);
  m.impl("lifted_fwd", &lifted_fwd_cuda);
  m.impl("lifted_bwd", &lifted_bwd_cuda);
}

}  // namespace metrix_ops
