// MultiSimilarityLoss with PML's MultiSimilarityMiner of a batch against itself (the
// library's flagship recipe: loss(x, y, miner(x, y))) on the CPU, over the blocks I <= J of
// the symmetric S = x xᵀ: the miner's bounds pass, the forward and the backward each visit a
// block pair once. The general ops (ms_loss_cpu.cpp) stream every row against all
// references: 1 + 1 + 3 products where these take ½ + ½ + 1½.
//
// The miner's thresholds are per anchor, so a block entry serves its row with the row's
// thresholds and its column with the column's: the column side goes through a tiled
// transposed copy of the block (block_transpose.h) and the same row kernels (ms_blocks.h),
// which carry the miner; the backward's H = G_IJ + G_JIᵀ is added back the same way.
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cpu/block_transpose.h"
#include "cpu/ms_blocks.h"
#include "cpu/sym_blocks.h"

namespace metrix_ops {

namespace {

void check_mined_self(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& hn,
                      const at::Tensor& hp, int64_t block) {
  check_self_inputs(x, labels, block);
  check_vec(hn, x.size(0), "hardest_neg");
  check_vec(hp, x.size(0), "hardest_pos");
  TORCH_CHECK(hn.scalar_type() == x.scalar_type() && hp.scalar_type() == x.scalar_type(),
              "hardest_neg and hardest_pos must have x's dtype ", x.scalar_type());
}

// f(s, r0, nr, c0, nc) on every block pair's rows and, off the diagonal, on its transpose
// (the columns' rows: r0, nr ↔ c0, nc), each with the block's storage
template <typename T, class F>
void each_side(const at::Tensor& x, int64_t block, F&& f) {
  std::vector<T> st;
  for_upper_blocks(x, block, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    f(s.data_ptr<T>(), r0, nr, c0, nc);
    if (c0 == r0) return;
    st.resize(nr * nc);
    transpose_block(s.data_ptr<T>(), nr, nc, st.data());
    f(st.data(), c0, nc, r0, nr);
  });
}

}  // namespace

// The miner's first pass: each anchor's hardest negative (largest s, −inf without one) and
// hardest positive (smallest s, +inf without one), self pair excluded
std::tuple<at::Tensor, at::Tensor> ms_mine_bounds_self_cpu(const at::Tensor& x_,
                                                           const at::Tensor& labels,
                                                           int64_t block) {
  check_self_inputs(x_, labels, block);
  auto x = x_.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  const int64_t B = x.size(0);
  at::Tensor hn = at::full({B}, -std::numeric_limits<double>::infinity(), x.options());
  at::Tensor hp = at::full({B}, std::numeric_limits<double>::infinity(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mine_bounds_self_cpu", [&] {
    using T = scalar_t;
    const int32_t* y = ids.data_ptr<int32_t>();
    T *neg = hn.data_ptr<T>(), *pos = hp.data_ptr<T>();
    const T inf = std::numeric_limits<T>::infinity();
    each_side<T>(x, block, [&](const T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      at::parallel_for(0, nr, row_grain(nc), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t gi = r0 + i, skip = gi - c0;
          const int32_t yi = y[gi];
          const int32_t* col = y + c0;
          const T* row = s + i * nc;
          T n = neg[gi], p = pos[gi];
          _Pragma("omp simd reduction(max : n) reduction(min : p)")
          for (int64_t j = 0; j < nc; ++j) {
            const T v = row[j];
            const T vn = col[j] != yi ? v : -inf;
            const T vp = col[j] == yi && j != skip ? v : inf;
            n = vn > n ? vn : n;
            p = vp < p ? vp : p;
          }
          neg[gi] = n;
          pos[gi] = p;
        }
      });
    });
  });
  return {hn, hp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_mined_self_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& labels, const at::Tensor& hardest_neg,
    const at::Tensor& hardest_pos, double alpha, double beta, double base, double eps,
    int64_t block) {
  check_mined_self(x_, labels, hardest_neg, hardest_pos, block);
  auto x = x_.contiguous();
  auto hn = hardest_neg.contiguous(), hp = hardest_pos.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  const int64_t B = x.size(0);
  at::Tensor rows = at::zeros({B}, x.options());
  at::Tensor lse_pos = at::zeros({B}, x.options()), lse_neg = at::zeros({B}, x.options());
  at::Tensor kept = at::zeros({B, 2}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mined_self_fwd_cpu", [&] {
    using T = scalar_t;
    std::vector<OnlineLse<T>> pos(B, lse_with_one<T>()), neg(B, lse_with_one<T>());
    const int32_t* y = ids.data_ptr<int32_t>();
    const BlockLabels lab{y, y, true};
    const MsMiner<T> mine{hn.data_ptr<T>(), hp.data_ptr<T>(), T(eps), kept.data_ptr<int64_t>()};
    each_side<T>(x, block, [&](const T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      ms_fold_block<T>(s, nr, nc, r0, c0, lab, T(alpha), T(beta), T(base), pos.data(),
                       neg.data(), false, mine);
    });
    ms_finish_rows<T>(pos, neg, T(alpha), T(beta), rows, lse_pos, lse_neg);
  });
  return {rows, lse_pos, lse_neg, kept};
}

at::Tensor ms_mined_self_bwd_cpu(const at::Tensor& grad_rows, const at::Tensor& x_,
                                 const at::Tensor& labels, const at::Tensor& lse_pos_,
                                 const at::Tensor& lse_neg_, const at::Tensor& hardest_neg,
                                 const at::Tensor& hardest_pos, double alpha, double beta,
                                 double base, double eps, int64_t block) {
  check_mined_self(x_, labels, hardest_neg, hardest_pos, block);
  auto x = x_.contiguous();
  const auto v = row_vectors(x, {{&grad_rows, "grad_rows"}, {&lse_pos_, "lse_pos"},
                                 {&lse_neg_, "lse_neg"}});
  auto hn = hardest_neg.contiguous(), hp = hardest_pos.contiguous();
  const at::Tensor ids = ms_label_ids(labels);
  at::Tensor dx = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ms_mined_self_bwd_cpu", [&] {
    using T = scalar_t;
    const int32_t* y = ids.data_ptr<int32_t>();
    const BlockLabels lab{y, y, true};
    const MsMiner<T> mine{hn.data_ptr<T>(), hp.data_ptr<T>(), T(eps), nullptr};
    const T *g = v[0].data_ptr<T>(), *lp = v[1].data_ptr<T>(), *ln = v[2].data_ptr<T>();
    auto grad = [&](T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      ms_grad_block<T>(s, nr, nc, r0, c0, lab, g, lp, ln, T(alpha), T(beta), T(base), false,
                       mine);
    };
    std::vector<T> st;
    for_upper_blocks(x, block, [&](at::Tensor& s, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
      T* sp = s.data_ptr<T>();
      st.resize(nr * nc);
      if (c0 == r0) {  // G of a diagonal block, then H = G + Gᵀ (st: a copy of G)
        grad(sp, r0, nr, c0, nc);
        std::copy(sp, sp + nr * nc, st.data());
      } else {  // G_IJ, and G_JI from the transposed block before s is overwritten
        transpose_block(sp, nr, nc, st.data());
        grad(sp, r0, nr, c0, nc);
        grad(st.data(), c0, nc, r0, nr);
      }
      add_transposed(sp, nr, nc, st.data());
      add_sym_block_grad(dx, x, s, r0, nr, c0, nc);
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(metrix_ops, m) {
  // ms_mine_bounds / ms_mined_fwd / ms_mined_bwd of the batch against itself (self pairs
  // excluded) over the symmetric blocks of S, `block` rows each
  m.def("ms_mine_bounds_self(Tensor x, Tensor labels, int block) -> (Tensor, Tensor)");
  m.def("ms_mined_self_fwd(Tensor x, Tensor labels, Tensor hardest_neg, Tensor hardest_pos, "
        "float alpha, float beta, float base, float eps, int block) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ms_mined_self_bwd(Tensor grad_rows, Tensor x, Tensor labels, Tensor lse_pos, "
        "Tensor lse_neg, Tensor hardest_neg, Tensor hardest_pos, float alpha, float beta, "
        "float base, float eps, int block) -> Tensor");
}

TORCH_LIBRARY_IMPL(metrix_ops, CPU, m) {
  m.impl("ms_mine_bounds_self", &ms_mine_bounds_self_cpu);
  m.impl("ms_mined_self_fwd", &ms_mined_self_fwd_cpu);
  m.impl("ms_mined_self_bwd", &ms_mined_self_bwd_cpu);
}

}  // namespace metrix_ops
