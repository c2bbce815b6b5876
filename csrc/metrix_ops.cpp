// The one schema file: every op of the library is declared here; implementations are
// registered per device in cpu/ and cuda/ (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import metrix_ops._C` loads this shared object, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
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
}

}  // namespace metrix_ops
