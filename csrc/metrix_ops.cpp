// The one schema file: every op of the library is declared here; implementations are
// registered per device in cpu/ and cuda/ (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/library.h>

// `import metrix_ops._C` loads this shared object, which runs the static TORCH_LIBRARY
// registrations; the module itself is empty (ops are reached through torch.ops.metrix_ops).
// PyMODINIT_FUNC gives the extern "C" linkage and default visibility Python looks up.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

namespace metrix_ops {

bool compiled_with_cuda() {
#ifdef METRIX_OPS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(metrix_ops, m) {
  // Row statistics of S = scale * normalize(x) @ normalize(r)^T, streamed over r in chunks
  // of `chunk` rows: (row max, row argmax with lowest index on ties, row logsumexp).
  m.def("sim_row_stats(Tensor x, Tensor r, float scale, int chunk) -> (Tensor, Tensor, Tensor)");
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  // Multi-similarity loss of unit anchors x against unit references r, streamed over r:
  // per-anchor loss terms and the two per-row log(1 + Σ e^·) the backward needs.
  m.def("ms_loss_fwd(Tensor x, Tensor r, Tensor labels, Tensor ref_labels, bool exclude_diag, "
        "float alpha, float beta, float base, int chunk) -> (Tensor, Tensor, Tensor)");
  m.def("ms_loss_bwd(Tensor grad_rows, Tensor x, Tensor r, Tensor labels, Tensor ref_labels, "
        "Tensor lse_pos, Tensor lse_neg, bool exclude_diag, float alpha, float beta, "
        "float base, int chunk) -> (Tensor, Tensor)");
  // The same against the batch itself, using the symmetry of S (blocks I <= J only).
  m.def("ms_loss_self_fwd(Tensor x, Tensor labels, float alpha, float beta, float base, "
        "int block) -> (Tensor, Tensor, Tensor)");
  m.def("ms_loss_self_bwd(Tensor grad_rows, Tensor x, Tensor labels, Tensor lse_pos, "
        "Tensor lse_neg, float alpha, float beta, float base, int block) -> Tensor");
}

}  // namespace metrix_ops
