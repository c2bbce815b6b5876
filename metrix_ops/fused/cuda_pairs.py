"""backend="cuda" for MultiSimilarityLoss and ContrastiveLoss: the CPU glue as is (its
general ops ms_loss_fwd/bwd and contrastive_fwd/bwd have CUDA implementations in
csrc/cuda/pair_losses_cuda.cu, dispatched by device), for CUDA tensors when the CUDA kernels
were compiled."""
from __future__ import annotations

from .. import _ext
from . import contrastive, multi_similarity, register


def _on_cuda(supports):
    def cuda_supports(params, inp, expansion) -> bool:
        return (_ext.HAS_CUDA_EXT and inp.embeddings.device.type == "cuda"
                and supports(params, inp, expansion))
    return cuda_supports


register("cuda", "MultiSimilarityLoss", _on_cuda(multi_similarity.supports),
         multi_similarity.impl)
register("cuda", "ContrastiveLoss", _on_cuda(contrastive.supports), contrastive.impl)
