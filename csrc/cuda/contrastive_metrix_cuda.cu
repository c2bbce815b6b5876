// Embedding-level Metrix for ContrastiveLoss on the CUDA engine (cuda/metrix_rows.cuh: pairs
// "pos_neg" or "anchor_neg", the batch against itself or against references): per anchor the
// sums and counts of its candidates' terms λ·[·]₊ (positive side) and (1−λ)·[·]₊ (negative
// side), each counted when > 0 (common/contrastive_metrix.h, the CPU kernels' per-candidate code); the glue
// AvgNonZero-reduces each side over all candidates of all anchors (DESIGN §3). The
// candidates' weight: w = g⁺_a ∂pos/∂s̃ + g⁻_a ∂neg/∂s̃.
#include <torch/library.h>

#include <cmath>

#include "common/contrastive_metrix.h"
#include "cuda/metrix_rows.cuh"
#include "common/op_tags.h"

namespace metrix_ops {

namespace {

using cuda_metrix::MixPlan;
using cuda_metrix::kThreads;

using ConMixState = cuda_pairs::SideSums;  // (K−1)·B² terms: fp64 sums

template <typename T>
struct ConMix {
  using State = ConMixState;
  bool cosine;
  T lam, pos_margin, neg_margin;
  const T* g_pos = nullptr;  // backward: ∂L/∂(each anchor's two sums)
  const T* g_neg = nullptr;

  // the candidate's terms at its cosine v: on the L2 path d = √max(2 − 2v, 0), a coincident
  // candidate (2 − 2v below 16ε) taken at d = 0 with no slope, as the CPU kernels
  __device__ ConMixTerms<T> terms(T v) const {
    if (cosine) return con_mix_terms<T, T>(v, T(0), true, lam, pos_margin, neg_margin);
    const T q = con_mix_sq_dist<T, T>(v);
    const T d = std::sqrt(q);
    const T inv = q >= con_mix_coincident_below<T>() ? T(1) / d : T(0);
    return con_mix_terms<T, T>(d, inv, false, lam, pos_margin, neg_margin);
  }
  __device__ void push(State& st, T v) const {
    const ConMixTerms<T> t = terms(v);
    if (t.pos > T(0)) st.pos_sum += double(t.pos), ++st.pos_cnt;
    if (t.neg > T(0)) st.neg_sum += double(t.neg), ++st.neg_cnt;
  }
  __device__ bool live(int64_t a) const { return g_pos[a] != T(0) || g_neg[a] != T(0); }
  __device__ T weight(T v, int64_t a) const {
    const ConMixTerms<T> t = terms(v);
    return g_pos[a] * t.dpos + g_neg[a] * t.dneg;
  }
};

template <typename T>
__global__ void con_mix_finish_kernel(const ConMixState* state, int64_t n, T* ps, int64_t* pc,
                                      T* ns, int64_t* nc) {
  const int64_t a = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (a >= n) return;
  ps[a] = T(state[a].pos_sum);
  ns[a] = T(state[a].neg_sum);
  pc[a] = state[a].pos_cnt;
  nc[a] = state[a].neg_cnt;
}

using FourTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The ops' bodies on a call's plan
FourTensors con_mix_fwd(const MixPlan& c, bool cosine, double pos_margin, double neg_margin,
                        double lam, bool anchor_neg) {
  const int64_t B = c.x.size(0);
  at::Tensor ps = at::zeros({B}, c.x.options()), ns = at::zeros_like(ps);
  at::Tensor pc = at::zeros({B}, c.labels.options()), nc = at::zeros_like(pc);
  if (B == 0) return {ps, pc, ns, nc};
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "contrastive_metrix_mix_fwd_cuda", [&] {
    using T = scalar_t;
    const ConMix<T> m{cosine, T(lam), T(pos_margin), T(neg_margin)};
    at::Tensor buf = cuda_pairs::make_states(B, ConMixState::empty(), c.x.options());
    auto* state = reinterpret_cast<ConMixState*>(buf.data_ptr());
    cuda_metrix::fold_all_mix<ConMix<T>, T>(c, anchor_neg, T(lam), m, state);
    con_mix_finish_kernel<T><<<(unsigned)((B + kThreads - 1) / kThreads), kThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(
        state, B, ps.data_ptr<T>(), pc.data_ptr<int64_t>(), ns.data_ptr<T>(),
        nc.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ps, pc, ns, nc};
}

std::pair<at::Tensor, at::Tensor> con_mix_bwd(const MixPlan& c, const at::Tensor& grad_pos,
                                              const at::Tensor& grad_neg, bool cosine,
                                              double pos_margin, double neg_margin, double lam,
                                              bool anchor_neg, bool need_dc) {
  check_row_vec(grad_pos, c.x, "grad_pos");
  check_row_vec(grad_neg, c.x, "grad_neg");
  auto gp = grad_pos.to(c.x.scalar_type()).contiguous();
  auto gn = grad_neg.to(c.x.scalar_type()).contiguous();
  std::pair<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "contrastive_metrix_mix_bwd_cuda", [&] {
    using T = scalar_t;
    const ConMix<T> m{cosine, T(lam), T(pos_margin), T(neg_margin), gp.data_ptr<T>(),
                      gn.data_ptr<T>()};
    out = cuda_metrix::grad_all_mix<ConMix<T>, T>(c, anchor_neg, T(lam), m, need_dc);
  });
  return out;
}

}  // namespace

FourTensors contrastive_metrix_mix_fwd_cuda(const at::Tensor& x, const at::Tensor& labels,
                                            const at::Tensor& cstart, const at::Tensor& csize,
                                            bool cosine, double pos_margin, double neg_margin,
                                            double lam, bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return con_mix_fwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), cosine,
                     pos_margin, neg_margin, lam, anchor_neg);
}

at::Tensor contrastive_metrix_mix_bwd_cuda(const at::Tensor& grad_pos, const at::Tensor& grad_neg,
                                           const at::Tensor& x, const at::Tensor& labels,
                                           const at::Tensor& cstart, const at::Tensor& csize,
                                           bool cosine, double pos_margin, double neg_margin,
                                           double lam, bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_mix_call(x, labels, cstart, csize, lam, chunk);  // x on CUDA first
  c10::cuda::CUDAGuard guard(x.device());
  return con_mix_bwd(cuda_metrix::self_plan(x, labels, cstart, csize, chunk), grad_pos,
                     grad_neg, cosine, pos_margin, neg_margin, lam, anchor_neg, true)
      .first;
}

FourTensors contrastive_metrix_mix_refs_fwd_cuda(const at::Tensor& x, const at::Tensor& r,
                                                 const at::Tensor& labels,
                                                 const at::Tensor& ref_labels,
                                                 const at::Tensor& self, bool cosine,
                                                 double pos_margin, double neg_margin,
                                                 double lam, bool anchor_neg, int64_t chunk) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return con_mix_fwd(c, cosine, pos_margin, neg_margin, lam, anchor_neg);
}

std::tuple<at::Tensor, at::Tensor> contrastive_metrix_mix_refs_bwd_cuda(
    const at::Tensor& grad_pos, const at::Tensor& grad_neg, const at::Tensor& x,
    const at::Tensor& r, const at::Tensor& labels, const at::Tensor& ref_labels,
    const at::Tensor& self, bool cosine, double pos_margin, double neg_margin, double lam,
    bool anchor_neg, int64_t chunk, bool need_dr) {
  cuda_metrix::check_refs_call(x, r, labels, ref_labels, self, lam, chunk);
  c10::cuda::CUDAGuard guard(x.device());
  const MixPlan c =
      cuda_metrix::refs_plan(x, r, labels, ref_labels, self, chunk, anchor_neg);
  return con_mix_bwd(c, grad_pos, grad_neg, cosine, pos_margin, neg_margin, lam, anchor_neg,
                     need_dr);
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // ContrastiveLoss's embedding-level Metrix term on CUDA tensors: unit rows x sorted by
  // label, each row's class start and size; cosine: CosineSimilarity margins, else the L2
  // distance of unit rows. Per anchor (pos_sum, pos_count, neg_sum, neg_count) of its
  // candidates' terms > 0. Row chunks of whole classes, about `chunk` rows each.
  m.def("contrastive_metrix_mix_fwd(Tensor x, Tensor labels, Tensor class_start, "
        "Tensor class_size, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, int chunk) -> (Tensor, Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("contrastive_metrix_mix_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor labels, "
        "Tensor class_start, Tensor class_size, bool cosine, float pos_margin, "
        "float neg_margin, float lam, bool anchor_neg, int chunk) -> Tensor",
        METRIX_HOST_READS);
  // The same against references (ms_metrix_mix_refs_fwd's arguments and chunks)
  m.def("contrastive_metrix_mix_refs_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor self, bool cosine, float pos_margin, float neg_margin, float lam, "
        "bool anchor_neg, int chunk) -> (Tensor, Tensor, Tensor, Tensor)",
        METRIX_HOST_READS);
  m.def("contrastive_metrix_mix_refs_bwd(Tensor grad_pos, Tensor grad_neg, Tensor x, Tensor r, "
        "Tensor labels, Tensor ref_labels, Tensor self, bool cosine, float pos_margin, "
        "float neg_margin, float lam, bool anchor_neg, int chunk, bool need_dr) "
        "-> (Tensor, Tensor)",
        METRIX_HOST_READS);
}

TORCH_LIBRARY_IMPL(metrix_ops, CUDA, m) {
  m.impl("contrastive_metrix_mix_fwd", &contrastive_metrix_mix_fwd_cuda);
  m.impl("contrastive_metrix_mix_bwd", &contrastive_metrix_mix_bwd_cuda);
  m.impl("contrastive_metrix_mix_refs_fwd", &contrastive_metrix_mix_refs_fwd_cuda);
  m.impl("contrastive_metrix_mix_refs_bwd", &contrastive_metrix_mix_refs_bwd_cuda);
}

}  // namespace metrix_ops
