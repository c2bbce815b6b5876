// CUDA implementation of the fused GeneralizedLiftedStructureLoss ops (the schemas of
// csrc/cpu/lifted_cpu.cpp's gen_lifted_fwd/bwd, so one Python glue serves both devices), on
// the row-chunk engine of cuda/pair_rows.cuh: per row the log-sum-exps of PML's margin
// exponents on each side, loss [lse⁺ + lse⁻]₊ with an empty side adding 0. Per-pair math:
// common/lifted.h, the header the CPU op uses.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/lifted.h"
#include "cuda/pair_rows.cuh"

namespace metrix_ops {

namespace {

using cuda_pairs::check_cuda_pair_call;
using cuda_pairs::fold_all;
using cuda_pairs::grad_all;
using cuda_pairs::kThreads;
using cuda_pairs::make_states;

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
  __device__ T grad(T s, bool pos, int64_t i) const {
    return gen_lifted_grad(s, pos, cosine, pos_margin, neg_margin, g_rows[i], lse_pos[i],
                           lse_neg[i]);
  }
};

template <typename T>
__global__ void gen_lifted_finish_kernel(const typename GenLiftedRowLoss<T>::State* state,
                                         int64_t n, T* rows, T* lse_pos, T* lse_neg) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T lp = state[i].pos.value(), ln = state[i].neg.value();  // −inf for an empty side
  lse_pos[i] = lp;
  lse_neg[i] = ln;
  const T pre = gen_lifted_pre(lp, ln);
  rows[i] = pre > T(0) ? pre : T(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gen_lifted_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& r_, const at::Tensor& labels_,
    const at::Tensor& ref_labels_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  const int64_t B = x.size(0);
  at::Tensor rows = at::empty({B}, x.options()), lp = at::empty_like(rows),
             ln = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gen_lifted_fwd_cuda", [&] {
    using T = scalar_t;
    using State = typename GenLiftedRowLoss<T>::State;
    const GenLiftedRowLoss<T> loss{cosine, T(pos_margin), T(neg_margin)};
    at::Tensor buf = make_states(B, State::empty(), x.options());
    State* state = reinterpret_cast<State*>(buf.data_ptr());
    fold_all<GenLiftedRowLoss<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss, state);
    if (B > 0) {
      gen_lifted_finish_kernel<T><<<(int)((B + kThreads - 1) / kThreads), kThreads, 0,
                                    c10::cuda::getCurrentCUDAStream()>>>(
          state, B, rows.data_ptr<T>(), lp.data_ptr<T>(), ln.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {rows, lp, ln};
}

std::tuple<at::Tensor, at::Tensor> gen_lifted_bwd_cuda(
    const at::Tensor& grad_rows, const at::Tensor& x_, const at::Tensor& r_,
    const at::Tensor& labels_, const at::Tensor& ref_labels_, const at::Tensor& lse_pos_,
    const at::Tensor& lse_neg_, bool exclude_diag, bool cosine, double pos_margin,
    double neg_margin, int64_t chunk) {
  check_cuda_pair_call(x_, r_, labels_, ref_labels_, chunk);
  check_row_vec(grad_rows, x_, "grad_rows");
  check_row_vec(lse_pos_, x_, "lse_pos");
  check_row_vec(lse_neg_, x_, "lse_neg");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), r = r_.contiguous();
  auto labels = labels_.contiguous(), ref_labels = ref_labels_.contiguous();
  auto g = grad_rows.to(x.scalar_type()).contiguous();
  auto lp = lse_pos_.to(x.scalar_type()).contiguous(), ln = lse_neg_.to(x.scalar_type()).contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gen_lifted_bwd_cuda", [&] {
    using T = scalar_t;
    const GenLiftedRowLoss<T> loss{cosine, T(pos_margin), T(neg_margin), g.data_ptr<T>(),
                                   lp.data_ptr<T>(), ln.data_ptr<T>()};
    out = grad_all<GenLiftedRowLoss<T>, T>(x, r, labels, ref_labels, exclude_diag, chunk, loss);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("gen_lifted_fwd", &gen_lifted_fwd_cuda);
  m.impl("gen_lifted_bwd", &gen_lifted_bwd_cuda);
}

}  // namespace metrix_ops
