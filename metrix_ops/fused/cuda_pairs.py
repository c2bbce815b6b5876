"""backend="cuda": the CPU glue as is for the losses whose general ops have CUDA
implementations (csrc/cuda/pair_losses_cuda.cu: ms_loss, contrastive, circle;
csrc/cuda/lifted_cuda.cu: gen_lifted; csrc/cuda/proxy_losses_cuda.cu: proxy_anchor, proxy_nca,
which NPairsLoss also runs on; csrc/cuda/ntxent_cuda.cu: ntxent, supcon; csrc/cuda/triplet_cuda.cu: triplet_all, the
all-triplets TripletMarginLoss; csrc/cuda/hphn_mine_cuda.cu: ee_hphn_mine without segments,
the clean HPHNTripletLoss; csrc/cuda/lifted_cuda.cu: lifted, LiftedStructureLoss;
csrc/cuda/ms_mined_cuda.cu: ms_mine_bounds and ms_mined, MultiSimilarityLoss with
miner=MultiSimilarityMiner; triplet_cuda.cu's triplet_mined, TripletMarginLoss with
miner=TripletMarginMiner (BatchHardMiner's streamed picks are PyTorch); csrc/cuda/pair_sims_cuda.cu:
pair_sims, the indices_tuple paths of fused/indices/; dispatched by device), for CUDA tensors
when the CUDA kernels were compiled. The batch against itself takes the symmetric self ops
where they have CUDA kernels (ms_loss_self, ms_mined_self, contrastive_self, circle_self,
gen_lifted_self, supcon_self, ntxent_self: fused/multi_similarity._self_pairs_only), else
(LiftedStructureLoss) the general op with r = x."""
from __future__ import annotations

import torch

from .. import _ext
from . import (circle, contrastive, generalized_lifted, hphn_triplet, lifted_structure,
               multi_similarity, npairs, ntxent, proxy_anchor, proxy_nca, register,
               register_indices, register_miner, triplet_margin, INDICES_IMPLS)


def _on_cuda(supports):
    def cuda_supports(params, inp, expansion) -> bool:
        return (_ext.HAS_CUDA_EXT and inp.embeddings.device.type == "cuda"
                and supports(params, inp, expansion))
    return cuda_supports


def _deterministic_triplet(supports):
    """smooth_loss' backward adds with float atomics (triplet_cuda.cu): under
    torch.use_deterministic_algorithms(True) (not warn_only) the call goes to the next engine
    that covers it (the reference), as torch's ops take their deterministic algorithms; with
    warn_only the op runs and warns."""
    def triplet_supports(params, inp, *rest) -> bool:
        # (smooth_loss first: the warn_only query does not trace; inside a compiled graph
        # the op runs and its backward alerts)
        if params.get("smooth_loss") and not torch.compiler.is_compiling() and (
                torch.are_deterministic_algorithms_enabled()
                and not torch.is_deterministic_algorithms_warn_only_enabled()):
            return False
        return supports(params, inp, *rest)
    return triplet_supports


def _hphn_supports(params, inp, expansion) -> bool:
    """The clean loss only: the CUDA mining op has no Embedding Expansion search."""
    return expansion is None and hphn_triplet.supports(params, inp, expansion)


for _name, _supports, _impl in [
        ("MultiSimilarityLoss", multi_similarity.supports, multi_similarity.impl),
        ("ContrastiveLoss", contrastive.supports, contrastive.impl),
        ("CircleLoss", ntxent.supports, circle.impl),
        ("NTXentLoss", ntxent.supports, ntxent.ntxent_impl),
        ("SupConLoss", ntxent.supports, ntxent.supcon_impl),
        ("ProxyAnchorLoss", proxy_anchor.supports, proxy_anchor.impl),
        ("ProxyNCALoss", proxy_nca.supports, proxy_nca.impl),
        ("GeneralizedLiftedStructureLoss", generalized_lifted.supports, generalized_lifted.impl),
        ("NPairsLoss", npairs.supports, npairs.impl),
        ("TripletMarginLoss", _deterministic_triplet(triplet_margin.supports),
         triplet_margin.impl),
        ("HPHNTripletLoss", _hphn_supports, hphn_triplet.impl),
        ("LiftedStructureLoss", lifted_structure.supports, lifted_structure.impl)]:
    register("cuda", _name, _on_cuda(_supports), _impl)

# indices_tuple: the CPU glue (fused/indices/) on CUDA tensors, whose ops have CUDA kernels:
# pair_sims (csrc/cuda/pair_sims_cuda.cu), the ProxyNCA op (NPairs, ProxyNCA) and the
# weighted ProxyAnchor op (proxy_losses_cuda.cu)
if _ext.has_cuda_kernel("pair_sims_fwd"):
    for (_backend, _name), (_supports, _impl) in list(INDICES_IMPLS.items()):
        if _backend == "cpu":
            register_indices("cuda", _name, _on_cuda(_supports), _impl)

# miner= inside the op: the same glue as the CPU's
register_miner("cuda", "MultiSimilarityLoss", _on_cuda(multi_similarity.miner_supports),
               multi_similarity.miner_impl)
register_miner("cuda", "TripletMarginLoss",
               _on_cuda(_deterministic_triplet(triplet_margin.miner_supports)),
               triplet_margin.miner_impl)
