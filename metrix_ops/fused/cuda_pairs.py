"""backend="cuda": the CPU glue as is for the losses whose general ops have CUDA
implementations (csrc/cuda/pair_losses_cuda.cu: ms_loss, contrastive, circle;
csrc/cuda/proxy_losses_cuda.cu: proxy_anchor, proxy_nca; dispatched by device), for CUDA
tensors when the CUDA kernels were compiled. The symmetric self ops are CPU-only: the glue
takes the general op with r = x on CUDA tensors."""
from __future__ import annotations

from .. import _ext
from . import circle, contrastive, multi_similarity, ntxent, proxy_anchor, proxy_nca, register


def _on_cuda(supports):
    def cuda_supports(params, inp, expansion) -> bool:
        return (_ext.HAS_CUDA_EXT and inp.embeddings.device.type == "cuda"
                and supports(params, inp, expansion))
    return cuda_supports


for _name, _module, _supports in [
        ("MultiSimilarityLoss", multi_similarity, multi_similarity.supports),
        ("ContrastiveLoss", contrastive, contrastive.supports),
        ("CircleLoss", circle, ntxent.supports),
        ("ProxyAnchorLoss", proxy_anchor, proxy_anchor.supports),
        ("ProxyNCALoss", proxy_nca, proxy_nca.supports)]:
    register("cuda", _name, _on_cuda(_supports), _module.impl)
