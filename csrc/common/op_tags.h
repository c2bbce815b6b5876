#pragma once
// Tags of an op's schema (TORCH_LIBRARY's m.def(schema, tags)).
//
// METRIX_HOST_READS: the op's CUDA implementation reads tensor data on the host (label
// layouts, chunk tables, label and index range checks), or its backward takes a table its forward read.
// A CUDA graph cannot capture such a read, and would bake the table of the captured call
// into every replay; with the tag, torch.compile(mode="reduce-overhead") leaves the op (and,
// without Inductor's graph partitioning, its graph) out of the CUDA graphs instead of failing
// at the read. The tag is torch >= 2.9's; before it, nothing (those versions capture such ops
// and fail there, as any op that reads the host). metrix_ops/triton/launch.py tags the
// Triton engine's ops of the same kind.
#include <torch/library.h>  // at::Tag
#include <torch/version.h>

#include <vector>

namespace metrix_ops {
// A named (lvalue) vector: m.def(schema, tags) then picks Library::def(schema, tags), not the
// overload that takes a function to register.
inline const std::vector<at::Tag>& host_reads_tags() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  static const std::vector<at::Tag> tags{at::Tag::cudagraph_unsafe};
#else
  static const std::vector<at::Tag> tags{};
#endif
  return tags;
}
}  // namespace metrix_ops

#define METRIX_HOST_READS (metrix_ops::host_reads_tags())
