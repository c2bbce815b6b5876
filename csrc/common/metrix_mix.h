// Embedding-level Metrix in closed form (DESIGN §1), shared by host and device code: the
// cosine between a unit anchor a and the normalised mix v = λ x_p + (1−λ) x_n of two unit
// points, from Gram entries only, and its derivatives back into those entries.
//
//   ‖v‖² = λ² + (1−λ)² + 2λ(1−λ) s_pn,   s(a, v̂) = (λ s_ap + (1−λ) s_an) / ‖v‖
//   ∂s/∂s_ap = λ/‖v‖,   ∂s/∂s_an = (1−λ)/‖v‖,   ∂s/∂s_pn = −s λ(1−λ)/‖v‖²
//
// ‖v‖ is clamped below at kMixEps (as F.normalize: a mix of antipodal points has no
// direction); where the clamp holds, ∂s/∂s_pn is 0. The CPU ops compute 1/‖v‖ per class
// tile of a block (cpu/metrix_blocks.h) and the rest per lane (cpu/metrix_mix_kernels.h).
#pragma once

namespace metrix_ops {

constexpr double kMixEps = 1e-12;

}  // namespace metrix_ops
